"""Checkpoints: a stopped run resumes bit for bit, saves are atomic and kill-proof, damage is named, exports load."""

import io
import json
import math
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_dir, tiny_recipe
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lean_relora.model.relora import relora_layers
from lean_relora.recipe import CheckpointConfig, load_recipe
from lean_relora.tools.export import export_model, load_trained
from lean_relora.training import checkpoint
from lean_relora.training.checkpoint import CheckpointError, CheckpointSaveError
from lean_relora.training.loop import TrainingDiverged, setup, train
from lean_relora.training.optim import optimizer_state
from lean_relora.training.progress import Reporter
from lean_relora.training.restart import restart
from lean_relora.training.step import train_step


class Quiet(Reporter):
    """Records lines instead of printing them; `on_step` lets a test act right after a step is logged."""

    def __init__(self, directory: Path, total: int = 100, on_step=None):
        super().__init__(directory / "metrics.jsonl", total, Console(file=io.StringIO()), live=False)
        self.lines, self.on_step = [], on_step

    def step(self, record, steps_to_restart):
        super().step(record, steps_to_restart)
        if self.on_step:
            self.on_step(record["step"])

    def line(self, text):
        self.lines.append(text)


def sigint_at(k):
    """What a user pressing Ctrl-C during step k does."""
    return lambda step: signal.raise_signal(signal.SIGINT) if step == k else None


def losses(directory):
    return [(r["step"], r["loss"]) for r in map(json.loads, (directory / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def recipe(quant="nf4", optim="paged_adamw8bit", warm_start=0, steps=10, every=0, keep_last=2, **kw):
    r = tiny_recipe(quant, steps=steps, warm_start=warm_start, restart_every=4, **kw)
    r.lora.dropout, r.relora.reset, r.optim.name = 0.1, "random", optim  # the torch RNG and run generator matter
    r.checkpoint = CheckpointConfig(every=every, keep_last=keep_last)
    return r


def tensors_of(path):
    return {f"{file}:{k}": v for file in (checkpoint.MODEL, checkpoint.BASE, checkpoint.TENSORS)
            for k, v in load_file(path / file).items()}


@pytest.mark.parametrize("quant,optim,warm_start,stop,steps", [
    ("nf4", "paged_adamw8bit", 0, 4, 10),  # stopped just before the restart of step 4; crosses the one of step 8
    ("nf4", "adamw8bit", 3, 2, 10),  # stopped in the full-rank warm start; ReLoRA starts after the resume
    ("int8", "adamw", 3, 5, 8),  # int8 base, 32-bit AdamW, stopped inside the first cycle
], ids=["nf4-8bit-restart", "warm-start", "int8-adamw"])
def test_stopped_and_resumed_run_matches_the_uninterrupted_one_bit_for_bit(tmp_path, tokenizer_cache, quant, optim,
                                                                          warm_start, stop, steps):
    (tmp_path / "whole").mkdir(), (tmp_path / "parts").mkdir()
    whole, parts = run_dir(tmp_path / "whole", tokenizer_cache), run_dir(tmp_path / "parts", tokenizer_cache)
    train(recipe(quant, optim, warm_start, steps), whole, Quiet(whole))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    first = train(recipe(quant, optim, warm_start, steps), parts, Quiet(parts, on_step=sigint_at(stop)))
    assert first.stopped_by == "SIGINT" and first.steps == stop
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    reporter = Quiet(parts)
    train(recipe(quant, optim, warm_start, steps), parts, reporter, resume="auto")
    assert any(line.startswith(f"resumed from {parts / 'checkpoints' / f'step-{stop:08d}'}") for line in reporter.lines)
    assert losses(parts) == losses(whole) and len(losses(whole)) == steps
    final = f"checkpoints/step-{steps:08d}"
    a, b = tensors_of(whole / final), tensors_of(parts / final)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if "8bit" in optim:
        assert any(k.endswith("state1") and v.dtype == torch.uint8 for k, v in a.items())  # 8-bit codes were saved


def test_kill_9_while_writing_checkpoints_always_leaves_a_loadable_latest(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    script = Path(__file__).parent / "ckpt_kill_trials.py"
    result = subprocess.run([sys.executable, str(script), str(directory), "12", "0"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(trials) == 12
    assert all(t["ok"] and t["found"] == t["latest"] and not t["problems"] for t in trials), trials
    assert any(any(name.startswith(".tmp-") for name in t["leftovers"]) for t in trials), trials  # killed mid-write
    assert len({t["latest"] for t in trials}) > 1  # the writers got checkpoints through between the kills


def test_checkpoint_holds_the_whole_state_and_keeps_only_the_last(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    r = recipe(steps=8, every=2, keep_last=2)
    train(r, directory, Quiet(directory))
    root = directory / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    path = root / "step-00000008"
    meta = checkpoint.verify(path)
    assert meta["step"] == 8 and meta["recipe_digest"] == r.digest()
    assert set(meta["files"]) == {checkpoint.MODEL, checkpoint.BASE, checkpoint.TENSORS, checkpoint.STATE,
                                  checkpoint.CONFIG, checkpoint.RECIPE}
    assert {"torch", "bitsandbytes", "transformers", "safetensors", "python"} <= set(meta["versions"])
    assert load_recipe(path / checkpoint.RECIPE) == r
    model, base, state = (load_file(path / f) for f in (checkpoint.MODEL, checkpoint.BASE, checkpoint.TENSORS))
    q = "model.layers.0.self_attn.q_proj"
    assert model[f"{q}.base.packed"].dtype == torch.uint8 and f"{q}.lora_A" in model and f"{q}.lora_B" in model
    assert "model.embed_tokens.weight" in model and "model.norm.weight" in model
    assert base[f"{q}.base.master"].dtype == torch.float32
    assert {f"{q}.base.quant_state.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                                  "quant_state.bitsandbytes__nf4")} <= set(base)
    assert {f"{q}.base.probe.{k}" for k in ("rows", "cols", "start", "now", "merged")} <= set(base)
    assert {"rng.torch", "rng.generator", "rng.numpy"} <= set(state)
    assert any(k.endswith(".qmap1") for k in state) and any(k.endswith(".absmax2") for k in state)
    saved = checkpoint.read_state(path)
    assert saved["train_state"]["step"] == 8 and saved["train_state"]["restarts"] == 1
    assert saved["train_state"]["micro_batches"] == 8 and saved["relora"] and saved["masters"]


def test_damaged_checkpoints_are_named_and_auto_falls_back_to_the_newest_intact_one(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    train(recipe(steps=6, every=2, keep_last=3), directory, Quiet(directory))
    root = directory / "checkpoints"
    six, four, two = (root / f"step-0000000{k}" for k in (6, 4, 2))
    data = (six / checkpoint.MODEL).read_bytes()
    (six / checkpoint.MODEL).write_bytes(data[: len(data) // 2])
    tensors = bytearray((four / checkpoint.TENSORS).read_bytes())
    tensors[-10] ^= 0xFF
    (four / checkpoint.TENSORS).write_bytes(bytes(tensors))
    with pytest.raises(CheckpointError, match=rf"step-00000006: model.safetensors is truncated \(\d+ of {len(data)}"):
        checkpoint.verify(six)
    with pytest.raises(CheckpointError, match=r"step-00000004: state.safetensors is corrupted \(sha256"):
        checkpoint.verify(four)
    found, problems = checkpoint.find_latest(directory)
    assert found == two and len(problems) == 2 and "truncated" in problems[0] and "corrupted" in problems[1]
    with pytest.raises(CheckpointError, match="truncated"):  # asked for by name: no silent fallback
        train(recipe(steps=6, every=2, keep_last=3), directory, Quiet(directory), resume=six)
    reporter = Quiet(directory)
    train(recipe(steps=6, every=2, keep_last=3), directory, reporter, resume="auto")
    assert sum(line.startswith("skipped damaged checkpoint") for line in reporter.lines) == 2
    assert checkpoint.find_latest(directory) == (six, [])  # rewritten; the damaged ones were set aside, not deleted
    assert len(list(root.glob("step-0000000[46].superseded-*"))) == 2
    (two / checkpoint.META).unlink()
    with pytest.raises(CheckpointError, match=r"step-00000002: incomplete checkpoint \(meta.json missing\)"):
        checkpoint.verify(two)


def test_recipe_changes_that_alter_the_run_are_refused_unless_forced(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    train(recipe(steps=4), directory, Quiet(directory))
    changed = recipe(steps=4)
    changed.lora.rank, changed.data.seq_len, changed.train.micro_batch_size = 4, 16, 2
    changed.data.bpe_vocab_size = 300  # setup would retrain (and replace) the run's tokenizer for this one
    tokenizer = (directory / "tokenizer" / "tokenizer.json").read_bytes()
    with pytest.raises(CheckpointError) as refused:
        train(changed, directory, Quiet(directory), resume="auto")
    assert ("data.bpe_vocab_size (512 -> 300), data.seq_len (32 -> 16), lora.rank (8 -> 4), "
            "train.micro_batch_size (8 -> 2); these change the run") in str(refused.value)
    assert "--force" in str(refused.value)
    faster = recipe(steps=6)
    faster.optim.lr = 1e-3
    with pytest.raises(CheckpointError, match=r"optim.lr \(0.003 -> 0.001\)"):
        train(faster, directory, Quiet(directory), resume="auto")
    reporter = Quiet(directory)
    assert train(faster, directory, reporter, resume="auto", force=True).steps == 6
    assert "resuming with changed optim.lr (0.003 -> 0.001), train.max_steps (4 -> 6) (forced)" in reporter.lines
    assert (directory / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer


def test_safe_recipe_changes_are_allowed_and_reported(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    train(recipe(steps=4), directory, Quiet(directory))
    longer = recipe(steps=6)
    longer.log.every, longer.eval.every = 2, 3
    reporter = Quiet(directory)
    assert train(longer, directory, reporter, resume=directory).steps == 6
    assert "resuming with changed train.max_steps (4 -> 6), eval.every (0 -> 3), log.every (1 -> 2)" in reporter.lines
    assert [s for s, _ in losses(directory)] == [1, 2, 3, 4, 6]


def test_a_nonfinite_loss_skips_the_step_and_leaves_weights_and_optimizer_alone(tmp_path, tokenizer_cache):
    run = setup(recipe(optim="adamw8bit"), run_dir(tmp_path, tokenizer_cache))
    for _ in range(2):
        train_step(run)
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    moments, _ = optimizer_state(run.optimizer)

    def poison(module, args, output):  # the trunk's hidden states: both HF's and the chunked loss compute from them
        output.last_hidden_state = output.last_hidden_state * math.nan
        return output

    hook = run.model.base_model.register_forward_hook(poison)
    assert math.isnan(train_step(run))
    hook.remove()
    assert (run.state.step, run.state.skipped, run.state.bad_steps, run.state.micro_batches) == (3, 1, 1, 3)
    assert all(torch.equal(p, weights[n]) for n, p in run.model.named_parameters())
    assert all(torch.equal(v, optimizer_state(run.optimizer)[0][k]) for k, v in moments.items())
    assert all(p.grad is None for p in run.model.parameters())
    assert math.isfinite(train_step(run)) and run.state.bad_steps == 0 and run.state.skipped == 1
    assert not torch.equal(run.model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])


def test_a_diverging_run_stops_after_the_skip_limit_with_a_checkpoint_of_the_last_good_state(tmp_path,
                                                                                            tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    r = recipe(steps=20)
    r.optim.lr, r.checkpoint.max_bad_steps = 1e30, 2  # Adam moves every weight by ~lr: the next forward overflows
    reporter = Quiet(directory)
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row had a NaN/inf loss or gradient "
                                               r"\(checkpoint.max_bad_steps = 2\); the weights and optimizer state of "
                                               r"the last good step are saved in .*step-\d+"):
        train(r, directory, reporter)
    skipped = [line for line in reporter.lines if "step skipped" in line]
    assert len(skipped) == 3 and "(3 in a row" in skipped[-1]
    path, _ = checkpoint.find_latest(directory)
    state = checkpoint.read_state(path)["train_state"]
    assert state["skipped"] == 3 and state["step"] < 20
    good = [s for s, loss in losses(directory) if loss is not None]  # a non-finite loss is written as null
    assert good and max(good) == state["step"] - 3  # the saved weights are those after the last finite step
    assert all(torch.isfinite(t).all() for t in load_file(path / checkpoint.MODEL).values() if t.is_floating_point())


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_with_a_clear_error(tmp_path,
                                                                                              tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead

    def fill_the_disk(step):  # after the checkpoint of step 2: files beyond 500 KB can no longer be written
        if step == 3:
            resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, limits[1]))

    try:
        with pytest.raises(CheckpointSaveError) as error:
            train(recipe(steps=6, every=2), directory, Quiet(directory, on_step=fill_the_disk))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    root = directory / "checkpoints"
    assert f"checkpoint step-00000004 could not be written to {root} (File too large" in str(error.value)
    assert f"the previous checkpoint {root / 'step-00000002'} is intact" in str(error.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]  # no half-written directory
    assert checkpoint.find_latest(directory) == (root / "step-00000002", [])
    assert train(recipe(steps=6, every=2), directory, Quiet(directory), resume="auto").steps == 6


def trained_run(tmp_path, tokenizer_cache, quant):
    """A run trained through a restart and saved, with its live model for reference."""
    directory = run_dir(tmp_path, tokenizer_cache)
    run = setup(recipe(quant, steps=6), directory)
    for step in range(6):
        if step == 3:
            restart(run)
        train_step(run)
    checkpoint.save(run, directory, keep_last=1)
    return run, directory


def test_export_round_trip_loads_in_transformers_and_matches_the_trained_model(tmp_path, tokenizer_cache):
    run, directory = trained_run(tmp_path, tokenizer_cache, quant="none")  # fp32 base: the trained model is exact
    ids = run.data.eval_batches(4, 1)[0]
    run.model.eval()
    with torch.no_grad():
        reference = run.model(input_ids=ids).logits
    for dtype, tolerance in (("fp32", 1e-5), ("bf16", 0.05)):
        export_model(directory, tmp_path / dtype, dtype)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / dtype)
        assert exported.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        with torch.no_grad():
            logits = exported(input_ids=ids).logits.float()
        assert (logits - reference).abs().max() <= tolerance * reference.abs().max(), dtype
    generated = exported.generate(ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()


def test_export_takes_the_weights_from_the_fp32_master_not_the_4bit_codes(tmp_path, tokenizer_cache):
    run, directory = trained_run(tmp_path, tokenizer_cache, quant="nf4")
    export_model(directory, tmp_path / "out", "fp32")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layer = relora_layers(run.model)[0]  # model.layers.0.self_attn.q_proj
    expected = layer.base.master.read().clone().addmm_(layer.lora_B.float(), layer.lora_A.float(), alpha=layer.scale)
    weight = exported.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(weight, expected)
    assert (weight - layer.base.dequantize()).abs().max() > 1e-4  # the nf4 codes are further off
    trained = load_trained(directory)
    assert torch.equal(relora_layers(trained.model)[0].base.master.read(), layer.base.master.read())
