"""bench/gpu_acceptance.py on a CPU: each part's failure stays in its own file, and part (b) times the loss training
uses (the chunked loss), not Hugging Face's. The shapes are shrunk to a 2-layer, 64-wide model so that each test
takes seconds; what is tested is the script's plumbing, which the size does not change."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lean_relora.model.loss

ROOT = Path(__file__).resolve().parents[2]




def load_bench():
    """bench/gpu_acceptance.py as a module (registered before it runs: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "bench" / "gpu_acceptance.py")
    module = sys.modules["gpu_acceptance"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GA = load_bench()


@pytest.fixture
def ga(monkeypatch):
    """The acceptance script with every shape shrunk to a model that trains in a fraction of a second."""
    module, real = GA, GA.shape_recipe

    def small(name, device):
        recipe = real("tiny", device)
        return replace(recipe,
                       model=replace(recipe.model, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                                     max_position_embeddings=64),
                       data=replace(recipe.data, seq_len=32, bpe_vocab_size=256),
                       train=replace(recipe.train, micro_batch_size=2),
                       lora=replace(recipe.lora, rank=4, alpha=4.0))

    monkeypatch.setattr(module, "shape_recipe", small)
    return module


def fake_pytest(*args, **kwargs):
    return subprocess.CompletedProcess(args[0], 0, stdout="...\n11 skipped, 424 deselected in 1.00s\n", stderr="")


def read(out: Path, part: str) -> dict:
    return json.loads((out / f"{part}.json").read_text())


def test_a_failing_part_leaves_the_other_parts_results_and_its_own_error(ga, monkeypatch, tmp_path):
    def planted(ctx, file):
        file.data["shape"] = ctx.throughput_shape  # what it knew before failing is kept beside the error
        raise RuntimeError("planted failure in part b")

    monkeypatch.setitem(ga.PART_FUNCTIONS, "throughput", planted)
    monkeypatch.setattr(ga.subprocess, "run", fake_pytest)
    code = ga.main(["--device", "cpu", "--out", str(tmp_path), "--shapes", "tiny", "--rounds", "1"])

    assert code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cuda_tests.json", "environment.json", "memory.json",
                                                          "restarts.json", "throughput.json"]
    failed = read(tmp_path, "throughput")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: planted failure in part b"
    assert "planted failure in part b" in failed["traceback"] and failed["shape"] == "tiny"
    memory = read(tmp_path, "memory")
    assert memory["status"] == "ok" and [r["shape"] for r in memory["rows"]] == ["tiny"]
    assert memory["rows"][0]["measured"] > 0 and 0.8 < memory["rows"][0]["ratio"] < 1.2
    restarts = read(tmp_path, "restarts")
    assert restarts["status"] == "ok" and restarts["rows"][0]["merge_seconds"] > 0
    tests = read(tmp_path, "cuda_tests")  # the part after the failed one still ran
    assert tests["status"] == "ok" and tests["summary"].startswith("11 skipped")
    env = read(tmp_path, "environment")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert {k: v["status"] for k, v in env["parts"].items()} == {
        "environment": "ok", "memory": "ok", "restarts": "ok", "throughput": "failed", "cuda_tests": "ok"}
    assert not list(tmp_path.glob(".*.tmp"))  # every atomic write was completed or cleaned up


@pytest.mark.parametrize("fail_at", [0, 1])
def test_memory_keeps_each_measured_row_and_restarts_says_what_it_skipped(ga, monkeypatch, tmp_path, fail_at):
    real, seen_on_disk = ga.measure, []

    def measure(*args, **kwargs):
        if len(seen_on_disk) == fail_at:
            # What a run killed now would leave: every shape measured before this one, on disk.
            seen_on_disk.append(read(tmp_path, "memory"))
            raise torch.cuda.OutOfMemoryError("planted: out of memory")
        seen_on_disk.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ga, "measure", measure)
    code = ga.main(["--device", "cpu", "--out", str(tmp_path), "--shapes", "tiny,350M",
                    "--skip", "throughput", "--skip", "cuda_tests"])

    assert code == 1
    on_disk = seen_on_disk[fail_at]
    assert on_disk["status"] == "running" and [r["shape"] for r in on_disk["rows"]] == ["tiny"][:fail_at]
    memory = read(tmp_path, "memory")
    assert memory["status"] == "failed" and memory["error"] == "OutOfMemoryError: planted: out of memory"
    assert [r["shape"] for r in memory["rows"]] == ["tiny"][:fail_at]
    restarts = read(tmp_path, "restarts")
    assert restarts["status"] == "skipped"
    assert "part (a) memory failed: OutOfMemoryError" in restarts["skipped"]
    assert restarts["skipped"].startswith("350M:" if fail_at else "tiny, 350M:")
    assert [r["shape"] for r in restarts.get("rows", [])] == ["tiny"][:fail_at]  # what (a) did measure is used
    assert not (tmp_path / "throughput.json").exists() and not (tmp_path / "cuda_tests.json").exists()


def test_a_timed_out_subprocess_fails_its_part_alone(ga, monkeypatch, tmp_path):
    def timeout(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout"))

    monkeypatch.setattr(ga.subprocess, "run", timeout)
    code = ga.main(["--device", "cpu", "--out", str(tmp_path), "--skip", "memory", "--skip", "throughput"])

    assert code == 1
    tests = read(tmp_path, "cuda_tests")
    assert tests["status"] == "failed" and tests["error"].startswith("TimeoutExpired: Command ")
    assert "timed out after 300 seconds" in tests["error"]
    env = read(tmp_path, "environment")
    assert env["parts"]["environment"]["status"] == "ok" and env["parts"]["restarts"]["status"] == "skipped"


def test_cuda_tests_part_reports_a_failing_pytest_as_failed(ga, monkeypatch, tmp_path):
    monkeypatch.setattr(ga.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 1, stdout="FAILED tests/test_cuda.py::test_x\n1 failed, 10 passed in 9.00s\n", stderr=""))
    code = ga.main(["--device", "cpu", "--out", str(tmp_path), "--skip", "memory", "--skip", "throughput"])
    assert code == 1
    tests = read(tmp_path, "cuda_tests")
    assert tests["status"] == "failed" and tests["summary"] == "1 failed, 10 passed in 9.00s"


def test_throughput_steps_every_variant_through_the_chunked_loss(ga, monkeypatch, tmp_path):
    chunked, hf_cross_entropy, step_losses, built = {}, [], [], {}
    real_chunked, real_ce = lean_relora.model.loss.linear_cross_entropy, torch.nn.functional.cross_entropy
    real_step_loss, real_build = ga.micro_batch_loss, ga.build_variants

    def count_chunked(hidden, head, labels, chunk_tokens, *args):
        assert chunk_tokens > 0
        chunked[id(head)] = chunked.get(id(head), 0) + 1
        return real_chunked(hidden, head, labels, chunk_tokens, *args)

    def count_ce(*args, **kwargs):  # Hugging Face's `model(input_ids, labels).loss` ends here; ours never does
        hf_cross_entropy.append(args[0].shape)
        return real_ce(*args, **kwargs)

    def count_step_loss(run, ids, *args):
        step_losses.append(run.model)
        return real_step_loss(run, ids, *args)

    def keep(*args):
        built.update(real_build(*args))
        return built

    monkeypatch.setattr(lean_relora.model.loss, "linear_cross_entropy", count_chunked)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", count_ce)
    monkeypatch.setattr(ga, "micro_batch_loss", count_step_loss)
    monkeypatch.setattr(ga, "build_variants", keep)
    code = ga.main(["--device", "cpu", "--out", str(tmp_path), "--rounds", "2", "--skip", "memory",
                    "--skip", "cuda_tests"])

    assert code == 0
    steps = 2 + 2  # two warm-up steps and two timed rounds per variant
    assert "lean-relora" in built and any(name.startswith("full-rank") for name in built)
    heads = {name: id(v.model.get_output_embeddings()) for name, v in built.items()}
    assert {name: chunked.get(head, 0) for name, head in heads.items()} == {name: steps for name in built}
    assert hf_cross_entropy == []
    # the lean-relora variant's loss is the training step's own function, on its model
    assert len(step_losses) == steps and all(m is built["lean-relora"].model for m in step_losses)
    result = read(tmp_path, "throughput")
    assert result["status"] == "ok" and result["loss_chunk_tokens"] > 0
    assert set(result["variants"]) == set(built)
    assert all(v["tokens_per_s"] > 0 and len(v["step_seconds"]) == 2 for v in result["variants"].values())


def load_preflight():
    spec = importlib.util.spec_from_file_location("preflight", ROOT / "bench" / "preflight.py")
    module = sys.modules["preflight"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preflight_on_a_cpu_takes_a_step_restarts_and_records_the_versions(tmp_path):
    assert load_preflight().main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["imports"]["status"] == "ok" and report["imports"]["torch"] == torch.__version__
    assert Path(report["imports"]["lean_relora"]) == ROOT / "lean_relora"  # this checkout, not an installed copy
    step = report["step"]
    assert step["status"] == "ok" and step["quant"] == "nf4" and step["merge_seconds"] > 0
    assert 0.9 < step["retention"] <= 1.0 + 1e-6
    assert 0 < step["loss_after_restart"] < 20 and 0 < step["loss_before_restart"] < 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the failure a machine without CUDA gives")
def test_preflight_keeps_what_a_failed_check_found_and_runs_the_next(tmp_path):
    assert load_preflight().main(["--device", "cuda", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "preflight.json").read_text())
    imports = report["imports"]
    assert imports["status"] == "failed"
    assert imports["error"] == "RuntimeError: --device cuda: torch sees no CUDA device"
    assert imports["torch"] == torch.__version__ and imports["cuda_available"] is False
    assert report["step"]["status"] == "failed" and "traceback" in report["step"]
