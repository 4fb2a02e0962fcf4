"""End to end: the real `lean-relora` CLI on a tiny recipe, and one exact line with exit code 2 for bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MALFORMED, invoke


def test_train_runs_a_tiny_recipe_and_writes_metrics(tiny, tmp_path):
    run_dir = tmp_path / "run"
    code, output = invoke("train", tiny, "--run-dir", run_dir)
    assert code == 0, output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert set(steps[0]) == {"step", "loss", "lr", "tokens", "tokens_per_s", "restarts", "data_wait_s"}
    assert all(r["data_wait_s"] >= 0 for r in steps)
    assert steps[-1]["tokens"] == 7 * 4 * 32 and steps[-1]["restarts"] == 2
    assert [r["step"] for r in evals] == [0, 3, 6, 7]
    assert all(r["eval_ppl"] > 1 for r in evals)
    assert "restart 1" in output and "restart 2" in output and "run summary" in output


def test_set_and_max_steps_override_the_recipe(tiny, tmp_path):
    run_dir = tmp_path / "run"
    code, output = invoke("train", tiny, "--run-dir", run_dir, "--max-steps", 2, "--set", "lora.quant=int8",
                          "--set", "log.every=2")
    assert code == 0, output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]


@pytest.mark.parametrize("body,message", MALFORMED, ids=[m.split(":")[0] for _, m in MALFORMED])
def test_malformed_recipe_exits_2_with_one_line(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    code, output = invoke("train", path, "--run-dir", tmp_path / "run")
    assert code == 2
    assert output == f"error: {path}: {message}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--set", "lora.rank"], "error: --set 'lora.rank': expected section.key=value, e.g. --set lora.rank=16"),
    (["--max-steps", "0"], "error: --max-steps 0: must be >= 1"),
    (["--max-steps", "8"], "error: --max-steps 8: beyond train.max_steps (7), where the learning rate schedule ends; "
                           "to train longer raise it: --set train.max_steps=8"),
    (["--set", "data.source=/no/such/corpus.txt"], None),
    (["--set", "lora.targets=['nothing']"], None),
])
def test_bad_arguments_and_data_exit_2_with_one_line(tiny, tmp_path, args, message):
    code, output = invoke("train", tiny, "--run-dir", tmp_path / "run", *args)
    assert code == 2
    lines = output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in output
    if message:
        assert lines[-1] == message


def test_existing_run_is_never_overwritten(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    code, output = invoke("train", tiny, "--run-dir", run_dir)
    assert code == 2 and "already holds a run" in output
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_help_documents_every_command_and_option():
    code, output = invoke("train", "--help")
    assert code == 0
    for option in ("--set", "--run-dir", "--max-steps", "RECIPE"):
        assert option in output


def test_console_script_run_without_a_terminal_prints_a_plain_line_every_log_every_steps(tiny, tmp_path):
    run_dir = tmp_path / "run"
    script = Path(sys.executable).parent / "lean-relora"
    result = subprocess.run([str(script), "train", str(tiny), "--run-dir", str(run_dir), "--set", "log.every=2"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "━" not in result.stderr and "Traceback" not in result.stderr  # no progress bar redraws in a log
    assert "step 3: restart 1" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ") and "/7: " in line]
    assert [line.split("/")[0] for line in lines] == ["step 2", "step 4", "step 6", "step 7"]  # and the last step
    for line in lines:
        assert re.fullmatch(r"step \d/7: loss \d\.\d{4}, lr \d\.\d\de[-+]\d\d, [\d,]+ tok/s, ETA \d:\d\d:\d\d"
                            r"(, data wait \d+\.\d\d s)?, restarts? \d/2( in \d steps| now)?", line), line
    assert lines[0].endswith("restart 1/2 in 1 steps") and lines[-1].endswith("restarts 2/2")
    assert (run_dir / "metrics.jsonl").exists()
