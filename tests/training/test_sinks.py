"""training.sinks: the metrics records reach TensorBoard and an offline W&B run, and a missing library is one
line."""

import json
import math
import time
from pathlib import Path

import pytest

from lean_relora.recipe import LogConfig, RecipeError
from lean_relora.training.progress import Reporter, RunSummary
from lean_relora.training.sinks import check_sinks, open_sinks, scalars

RECORDS = [{"step": 0, "eval_loss": 5.5, "eval_ppl": 244.7, "tokens": 0},
           {"step": 1, "loss": 5.25, "lr": 1e-3, "tokens": 256, "tokens_per_s": 900.0, "restarts": 0,
            "data_wait_s": 0.0},
           {"step": 2, "loss": math.nan, "lr": 2e-3, "tokens": 512, "tokens_per_s": 800.0, "restarts": 0,
            "data_wait_s": 0.01},
           {"step": 2, "restart": 1, "merge_seconds": 0.5, "retention": 0.99}]


SUMMARY = RunSummary(steps=1, restarts=0, tokens=8, train_loss=None, first_eval_loss=5.0, last_eval_loss=4.0,
                     tokens_per_s=None, seconds=1.0, run_dir=Path("run"), checkpoint=None, next_command="")


def test_scalars_name_each_number_by_its_record_kind_and_leave_out_non_finite():
    assert scalars(RECORDS[1])["train/loss"] == 5.25 and "train/step" not in scalars(RECORDS[1])
    assert "train/loss" not in scalars(RECORDS[2]) and scalars(RECORDS[2])["train/lr"] == 2e-3
    assert set(scalars(RECORDS[3])) == {"restart/restart", "restart/merge_seconds", "restart/retention"}
    assert scalars(RECORDS[0])["eval/eval_loss"] == 5.5


def test_tensorboard_events_hold_every_record(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional extra lean-relora[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reporter = Reporter(tmp_path / "metrics.jsonl", 2, live=False,
                        sinks=open_sinks(LogConfig(tensorboard=True), tmp_path, {}))
    reporter.eval(0, 5.5, 0)
    reporter.step(RECORDS[1], 1)
    reporter.step(RECORDS[2], 0)
    reporter.restart(RECORDS[3])
    reporter.close(SUMMARY)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    value = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    assert value("train/loss") == [(1, 5.25)]
    assert value("train/lr") == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert value("eval/eval_loss") == [(0, 5.5)] and value("restart/retention") == [(2, pytest.approx(0.99))]


def test_wandb_offline_run_holds_the_records(tmp_path):
    pytest.importorskip("wandb", reason="the optional extra lean-relora[wandb]")
    reporter = Reporter(tmp_path / "metrics.jsonl", 2, live=False,
                        sinks=open_sinks(LogConfig(wandb="offline"), tmp_path, {"lora": {"rank": 4}}))
    reporter.step(RECORDS[1], 1)
    reporter.close(SUMMARY)
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30  # wandb's own service process writes the file, after finish() has returned
    while b"data_wait_s" not in (data := run.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    # wandb's record log stores the keys and JSON values as they were logged
    assert b"train/loss" in data and json.dumps(5.25).encode() in data and b"data_wait_s" in data


def test_a_missing_library_is_refused_with_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as on a machine without the extras
    with pytest.raises(RecipeError) as err:
        check_sinks(LogConfig(tensorboard=True))
    assert str(err.value) == ("log.tensorboard = true: the tensorboard package is not installed; pip install "
                              "'lean-relora[tensorboard]' or turn it off")
    with pytest.raises(RecipeError) as err:
        check_sinks(LogConfig(wandb="offline"))
    assert str(err.value) == ("log.wandb = 'offline': the wandb package is not installed; pip install "
                              "'lean-relora[wandb]' or turn it off")
    check_sinks(LogConfig())  # nothing asked, nothing checked
    with pytest.raises(RecipeError, match="wandb = 'online': must be one of , offline"):
        LogConfig(wandb="online")


def test_a_run_with_log_tensorboard_writes_the_losses_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional extra lean-relora[tensorboard]")
    from helpers import tiny_recipe
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lean_relora.training.loop import train

    recipe = tiny_recipe(steps=3)
    recipe.log.tensorboard = True
    train(recipe, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == logged
