"""`lean-relora report`: valid PNG plots of tiny runs, two runs overlaid, the spectrum of the accumulated update
(whose rank exceeds the LoRA rank after restarts), and one line + exit code 2 for bad input."""

import json
import math
import re
import shutil
import sys

import matplotlib.image as image  # the `report` extra; `.[test]` installs it
import numpy as np
import pytest
import torch
from helpers import TINY, invoke
from safetensors import safe_open
from transformers import AutoConfig

from lean_relora.tools import report, spectrum
from lean_relora.tools.export import load_trained, merged_layer
from lean_relora.training.checkpoint import MODEL, find_latest, saved_recipe
from lean_relora.training.loop import setup

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANK = 2
# Rank 2, restarts every 3 steps, 9 steps. warm: 3 full-rank steps, then cycles 3-6 and 6-9, a checkpoint every 3
# steps (the one at step 3 is dense: the end of the warm start). cold: no warm start, cycles 0-3, 3-6, 6-9, and only
# the final checkpoint, so its spectrum starts from the initial weights.
RECIPE = TINY + "[checkpoint]\nevery = 3\nkeep_last = 10\n"  # the CLI tests' tiny model, with these changes:
CHANGES = ["--set", f"lora.rank={RANK}", "--set", "train.max_steps=9", "--set", "train.micro_batch_size=2",
           "--set", "eval.batches=1"]
CYCLES = {"warm": 2, "cold": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "tiny.toml").write_text(RECIPE)
    code, output = invoke("train", root / "tiny.toml", "--run-dir", root / "warm", *CHANGES, "--set",
                          "relora.warm_start_steps=3")
    assert code == 0, output
    (root / "cold").mkdir()
    for item in ("tokenizer", "tokenizer_fingerprint.json"):  # the same BPE: training it once is enough
        (shutil.copytree if item == "tokenizer" else shutil.copy)(root / "warm" / item, root / "cold" / item)
    code, output = invoke("train", root / "tiny.toml", "--run-dir", root / "cold", *CHANGES,
                          "--set", "checkpoint.every=0", "--set", "optim.lr=2e-3")
    assert code == 0, output
    return root


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300, (path, pixels.shape)
    assert pixels[..., :3].std() > 0.01, f"{path}: blank"


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_report_writes_valid_pngs_into_the_run_and_changes_nothing_else(runs, tmp_path):
    run = shutil.copytree(runs / "warm", tmp_path / "warm")
    before = snapshot(run)
    code, output = invoke("report", run)
    assert code == 0, output
    names = ["loss.png", "lr.png", "throughput.png"]
    for name in names:
        assert_png(run / "report" / name)
        assert f"wrote {run / 'report' / name}" in output
    assert sorted(p.name for p in (run / "report").iterdir()) == names  # no temporary files left behind
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k.parts[0] != "report"} == before


def test_two_runs_are_overlaid_with_both_in_the_legend(runs, tmp_path):
    code, output = invoke("report", runs / "warm", runs / "cold", "--out", tmp_path / "out")
    assert code == 0, output
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert_png(tmp_path / "out" / name)
    figure = report.loss_figure({name: report.read_metrics(runs / name) for name in ("warm", "cold")})
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    report.pyplot().close(figure)
    assert legend == ["warm train", "warm eval", "cold train", "cold eval", "restart"]
    assert len(figure.axes[0].lines) == 4 + 1 + 2  # two curves per run, and a line at each restart (1 + 2)


def test_spectrum_of_a_relora_run_exceeds_the_lora_rank(runs, tmp_path):
    code, output = invoke("report", runs / "warm", runs / "cold", "--out", tmp_path, "--spectrum")
    assert code == 0, output
    assert_png(tmp_path / "spectrum.png")
    printed = {}
    for line in output.splitlines():
        match = re.match(r"\W*(warm|cold)\W+(ReLoRA, step \d|step-\d+|initial weights)\W+step-00000009\W+"
                         r"(\d+)\W+(\d+)\W*$", line)
        if match:
            printed[match[1]] = (match[2], int(match[3]), int(match[4]))
    assert printed["warm"][:2] == ("ReLoRA, step 3", RANK)
    assert printed["cold"][:2] == ("ReLoRA, step 0", RANK)
    assert printed["warm"][2] > RANK and printed["cold"][2] > RANK
    # The update is a sum of one rank-2 product per cycle: above that rank only fp32 rounding is left. A W_start
    # that was not exactly where training started would leave a full-rank difference instead.
    for name, cycles in CYCLES.items():
        s = spectrum.spectrum_of(runs / name)
        assert s.layer == "model.layers.0.mlp.down_proj" and s.effective_rank == printed[name][2]
        assert RANK < s.effective_rank <= RANK * cycles
        assert s.singular_values[RANK * cycles] < 1e-5 * s.singular_values[0]


def test_spectrum_is_the_relora_phase_alone_after_its_start_was_pruned(runs, tmp_path):
    """The known update: the newest checkpoint's merged weight minus the dense one at the end of the warm start.
    With that checkpoint pruned (keep_last), the spectrum is still that of the ReLoRA phase, not of the whole run."""
    end, _ = find_latest(runs / "warm")
    name = "model.layers.0.mlp.down_proj"
    layer = load_trained(end).model.get_submodule(name)
    with safe_open(runs / "warm" / "checkpoints" / "step-00000003" / MODEL, framework="pt") as f:
        known = merged_layer(layer).weight.detach().double() - f.get_tensor(f"{name}.weight").double()
    pruned = shutil.copytree(runs / "warm", tmp_path / "warm")
    for path in (pruned / "checkpoints").glob("step-*"):
        if path.name != end.name:
            shutil.rmtree(path)
    s = spectrum.spectrum_of(pruned)
    assert s.start == "ReLoRA, step 3" and s.end == end.name
    expected = torch.linalg.svdvals(known).numpy()
    np.testing.assert_allclose(s.singular_values[:RANK * 2], expected[:RANK * 2], rtol=1e-4)
    assert s.singular_values[RANK * 2] < 1e-6 * s.singular_values[0]  # two rank-2 cycles: rank 4, nothing more


def test_lr_plot_is_the_schedule_with_every_rewarm_and_the_warm_start_marked(runs):
    m = report.read_metrics(runs / "warm")
    found = report.schedules([runs / "warm"])
    figure = report.lr_figure({"warm": m}, found)
    ax = figure.axes[0]
    curve = ax.lines[0]
    xs, ys = curve.get_xdata(), curve.get_ydata()
    assert list(xs) == list(range(1, 10))  # every step, not only the logged ones
    logged = {r["step"]: r["lr"] for r in m["train"]}
    np.testing.assert_allclose([ys[x - 1] for x in logged], list(logged.values()), rtol=1e-12)
    for restart in column_steps(m["restart"]):
        assert ys[restart] == 0.0  # the update after a restart re-warms from 0
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "warm: warm start ends (step 3)" in legend and "restart" in legend
    bbox = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert bbox.x0 > 1.0  # outside the axes: it covers no data
    report.pyplot().close(figure)


def column_steps(records):
    return [int(r["step"]) for r in records]


def test_initial_weights_are_rebuilt_exactly_as_training_started(runs, tmp_path):
    end, _ = find_latest(runs / "cold")
    recipe, config = saved_recipe(end), AutoConfig.from_pretrained(end)
    for item in ("tokenizer", "tokenizer_fingerprint.json"):
        (shutil.copytree if item == "tokenizer" else shutil.copy)(runs / "cold" / item, tmp_path / item)
    started = setup(recipe, tmp_path).model  # fp32 model, nf4 base: its fp32 master is the dense initial weight
    state = torch.get_rng_state()
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        initial = spectrum.initial_weight(recipe, config, name)
        assert torch.equal(initial, started.get_submodule(name).base.master.read())
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_read_metrics_keeps_the_last_record_of_each_step_and_reads_nan(tmp_path):
    records = [{"step": 0, "eval_loss": 6.0, "eval_ppl": 403.0, "tokens": 0},
               {"step": 1, "loss": 6.1, "lr": 1e-3, "tokens": 128, "tokens_per_s": 10.0, "restarts": 0},
               {"step": 2, "loss": 9.9, "lr": 1e-3, "tokens": 256, "tokens_per_s": 10.0, "restarts": 0},
               {"step": 2, "restart": 1, "merge_seconds": 0.1, "retention": 0.99},
               # killed after step 2, resumed from a checkpoint at step 1: step 2 again
               {"step": 2, "loss": 5.9, "lr": 1e-3, "tokens": 256, "tokens_per_s": 11.0, "restarts": 0},
               {"step": 3, "loss": math.nan, "lr": 1e-3, "tokens": 384, "tokens_per_s": 12.0, "restarts": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    m = report.read_metrics(tmp_path)
    assert [r["loss"] for r in m["train"]][:2] == [6.1, 5.9] and math.isnan(m["train"][2]["loss"])
    assert [r["step"] for r in m["eval"]] == [0] and [r["restart"] for r in m["restart"]] == [1]
    np.testing.assert_array_equal(report.restart_tokens(m), [256.0])


def test_help_documents_the_options():
    code, output = invoke("report", "--help")
    assert code == 0
    for option in ("RUN_DIR", "--out", "--spectrum", "--layer"):
        assert option in output


@pytest.mark.parametrize("case", ["missing", "not a run", "no checkpoint", "layer", "layer alone", "out is a file",
                                  "no matplotlib"])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, monkeypatch, case):
    run, out = runs / "warm", tmp_path / "out"
    args, message = {
        "missing": ([tmp_path / "nope"], f"{tmp_path / 'nope'}: no such run directory"),
        "not a run": ([tmp_path], f"{tmp_path}: no metrics.jsonl; give a directory that `lean-relora train "
                                  "--run-dir` wrote"),
        "no checkpoint": ([tmp_path / "bare", "--spectrum"], None),
        "layer": ([run, "--spectrum", "--layer", "model.layers.9.mlp"], None),
        "layer alone": ([run, "--layer", "lm_head"], "--layer lm_head: only used with --spectrum; add --spectrum"),
        "out is a file": ([run, "--out", tmp_path / "file"], f"--out {tmp_path / 'file'}: exists and is not a "
                                                              "directory; choose a directory"),
        "no matplotlib": ([run], report.NEEDS_MATPLOTLIB),
    }[case]
    if case == "no checkpoint":
        (tmp_path / "bare").mkdir()
        shutil.copy(run / "metrics.jsonl", tmp_path / "bare")
    if case == "out is a file":
        (tmp_path / "file").write_text("keep me")
    if case == "no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is absent
    code, output = invoke("report", *args, *([] if case == "out is a file" else ["--out", out]))
    assert code == 2, output
    assert len(output.splitlines()) == 1 and output.startswith("error: "), output
    if message:
        assert output == f"error: {message}\n"
    if case == "layer":
        assert "model.layers.9.mlp: no such linear layer" in output
    assert not out.exists() and not (run / "report").exists()
    if case == "out is a file":
        assert (tmp_path / "file").read_text() == "keep me"
