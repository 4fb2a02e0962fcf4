"""The CLI around checkpoints: train --resume (after a real SIGTERM too), export and eval, and one line + exit code 2
for every kind of bad checkpoint input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, invoke
from transformers import AutoModelForCausalLM, AutoTokenizer

from lean_relora.cli.errors import STOPPED


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY + "[checkpoint]\nevery = 3\nkeep_last = 3\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished TINY run (7 steps, checkpoints at 3, 6 and 7); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("trained")
    (root / "tiny.toml").write_text(TINY + "[checkpoint]\nevery = 3\nkeep_last = 3\n")
    code, output = invoke("train", root / "tiny.toml", "--run-dir", root / "run")
    assert code == 0, output
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_sigterm_stops_a_training_subprocess_that_resumes_to_the_same_losses(tiny, tmp_path):
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    args = ["train", tiny, "--set", "train.max_steps=60", "--set", "eval.every=0", "--set", "checkpoint.every=0"]
    process = subprocess.Popen([str(Path(sys.executable).parent / "lean-relora"), *map(str, args), "--run-dir",
                                str(stopped)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if (stopped / "metrics.jsonl").exists() and len(losses(stopped)) >= 3:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == STOPPED == 75, stderr  # the documented code: saved, not failed, not done
    k = len(losses(stopped))
    assert 3 <= k < 60, stderr
    assert f"SIGTERM: stopped after step {k} of 60; continue with: lean-relora train --run-dir {stopped} --resume " \
           "auto" in stderr
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step-{k:08d}"
    code, output = invoke("train", "--run-dir", stopped, "--resume", "auto")  # the checkpoint's recipe is used
    assert code == 0, output
    assert f"resumed from {stopped / 'checkpoints' / f'step-{k:08d}'} at step {k}" in output
    code, output = invoke(*args, "--run-dir", whole)
    assert code == 0, output
    assert losses(stopped) == losses(whole) and [s for s, _ in losses(whole)] == list(range(1, 61))


def test_metrics_of_a_run_resumed_after_kill_9_are_strict_json_with_one_record_per_step(tiny, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["train", tiny, "--set", "train.max_steps=40", "--set", "eval.every=4", "--run-dir", run_dir]
    process = subprocess.Popen([str(Path(sys.executable).parent / "lean-relora"), *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 8:  # past the checkpoint of step 6
            process.kill()
            break
        time.sleep(0.01)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr
    killed_at = len(losses(run_dir))
    checkpoint_step = int((run_dir / "checkpoints" / "latest").read_text().strip()[len("step-"):])
    assert checkpoint_step < killed_at < 40  # steps past the checkpoint were logged and will be redone
    code, output = invoke("train", "--run-dir", run_dir, "--resume", "auto")
    assert code == 0, output

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    for kind in ("loss", "eval_loss", "restart"):
        steps = [r["step"] for r in records if kind in r]
        assert len(steps) == len(set(steps)), kind  # one record per step of each kind
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in records if "eval_loss" in r] == list(range(0, 41, 4))


def test_resume_auto_continues_with_safe_changes_and_reports_them(run):
    code, output = invoke("train", "--run-dir", run, "--resume", "auto", "--set", "train.max_steps=9",
                          "--set", "log.every=2")
    assert code == 0, output
    assert "resuming with changed train.max_steps (7 -> 9), log.every (1 -> 2)" in " ".join(output.split())
    assert [s for s, _ in losses(run)] == list(range(1, 8)) + [8, 9]


def test_a_recipe_change_that_alters_the_run_exits_2_naming_the_keys_unless_forced(run, tiny):
    code, output = invoke("train", tiny, "--run-dir", run, "--resume", "auto", "--set", "lora.rank=8",
                          "--set", "data.seq_len=16")
    assert code == 2
    lines = output.strip().splitlines()
    assert lines[-1] == (f"error: {run / 'checkpoints' / 'step-00000007'}: the recipe differs from the checkpoint's "
                         "in data.seq_len (32 -> 16), lora.rank (4 -> 8); these change the run: resume with the "
                         "checkpoint's recipe (omit RECIPE) or pass --force")
    code, output = invoke("train", tiny, "--run-dir", run, "--resume", "auto", "--set", "optim.lr=1e-3",
                          "--set", "train.max_steps=8", "--force")
    assert code == 0, output
    assert "(forced)" in output and [s for s, _ in losses(run)][-1] == 8


def damage(run):
    model = run / "checkpoints" / "step-00000007" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])


@pytest.mark.parametrize("case", ["truncated", "missing", "no checkpoints", "auto without run dir", "bad dtype",
                                  "export over data", "eval of nothing"])
def test_bad_checkpoint_input_exits_2_with_one_line(run, tmp_path, tiny, case):
    checkpoints = run / "checkpoints"
    if case == "truncated":
        damage(run)
        args, message = (["train", "--resume", checkpoints / "step-00000007"],
                         f"error: {checkpoints / 'step-00000007'}: model.safetensors is truncated (1000 of ")
    elif case == "missing":
        args, message = (["train", "--resume", tmp_path / "nope"],
                         f"error: {tmp_path / 'nope'}: no such checkpoint or run directory")
    elif case == "no checkpoints":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metrics.jsonl").write_text("")
        args, message = (["train", "--run-dir", tmp_path / "empty", "--resume", "auto"],
                         f"error: {tmp_path / 'empty'}: no complete checkpoint in {tmp_path / 'empty' / 'checkpoints'}")
    elif case == "auto without run dir":
        args, message = (["train", tiny, "--resume", "auto"],
                         "error: --resume auto: needs the run directory (--run-dir) whose checkpoints to continue")
    elif case == "bad dtype":
        args, message = (["export", run, tmp_path / "out", "--dtype", "fp8"],
                         "error: --dtype fp8: must be one of bf16, fp16, fp32")
    elif case == "export over data":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        args, message = (["export", run, tmp_path / "out"],
                         f"error: {tmp_path / 'out'}: already exists and is not an empty directory; choose a new one")
    else:
        args, message = (["eval", tmp_path / "nope"],
                         f"error: {tmp_path / 'nope'}: no such checkpoint or run directory")
    code, output = invoke(*args)
    assert code == 2, output
    assert "Traceback" not in output
    assert " ".join(output.split()).startswith(message), output
    if case == "export over data":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_resume_auto_skips_a_damaged_latest_with_a_warning(run):
    damage(run)
    code, output = invoke("train", "--run-dir", run, "--resume", "auto", "--set", "train.max_steps=8")
    assert code == 0, output
    flat = " ".join(output.split())
    assert "skipped damaged checkpoint" in flat and "model.safetensors is truncated" in flat
    assert f"resumed from {run / 'checkpoints' / 'step-00000006'} at step 6" in flat


def test_export_writes_a_model_transformers_loads_and_generates_with(run, tmp_path):
    code, output = invoke("export", run, tmp_path / "hf", "--dtype", "bf16")
    assert code == 0, output
    assert f"exported {run / 'checkpoints' / 'step-00000007'} to {tmp_path / 'hf'} (bf16)" in " ".join(output.split())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    ids = tokenizer("The return statement", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 and isinstance(tokenizer.decode(out[0]), str)


def test_eval_prints_the_loss_the_run_logged_and_takes_other_data(run, tmp_path):
    code, output = invoke("eval", run)
    assert code == 0, output
    last = [r for r in records(run) if "eval_loss" in r][-1]
    assert output.strip().splitlines()[-1].startswith(
        f"{run / 'checkpoints' / 'step-00000007'} (step 7): eval loss {last['eval_loss']:.4f}, "
        f"perplexity {last['eval_ppl']:.2f}")
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 8
                                  for i in range(40)))
    code, other = invoke("eval", run, "--data", corpus)
    assert code == 0, other
    assert "eval loss" in other and other.strip().splitlines()[-1] != output.strip().splitlines()[-1]


def test_help_documents_resume_export_and_eval():
    for args, words in ((["train", "--help"], ("--resume", "--force")),
                        (["export", "--help"], ("RUN_OR_CHECKPOINT", "OUT_DIR", "--dtype")),
                        (["eval", "--help"], ("RUN_OR_CHECKPOINT", "--data"))):
        code, output = invoke(*args)
        assert code == 0 and all(word in output for word in words), output


def test_a_diverging_run_exits_1_with_one_line_naming_the_saved_checkpoint(tiny, tmp_path):
    code, output = invoke("train", tiny, "--run-dir", tmp_path / "run", "--set", "optim.lr=1e30",
                          "--set", "checkpoint.max_bad_steps=1")
    assert code == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "2 steps in a row had a NaN/inf loss or gradient" in last
    assert f"saved in {tmp_path / 'run' / 'checkpoints' / 'step-'}" in last and "Traceback" not in output
