"""training.progress: metrics.jsonl is strict JSON and keeps one record per step across a resume; the status line
fits 80 columns, counts restarts exactly, and numbers are written one way."""

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from lean_relora.training.progress import Reporter, RunSummary, drop_records_after, duration, number
from lean_relora.training.schedule import JaggedCosine

SUMMARY = RunSummary(steps=1, restarts=0, tokens=8, train_loss=None, first_eval_loss=5.0, last_eval_loss=4.0,
                     tokens_per_s=None, seconds=1.0, run_dir=Path("run"), checkpoint=None, next_command="")


def strict(line):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_written_as_null(tmp_path, bad):
    reporter = Reporter(tmp_path / "metrics.jsonl", 10, live=False)
    reporter.step({"step": 1, "loss": bad, "lr": 1e-3, "tokens": 8, "tokens_per_s": 1.0, "restarts": 0,
                   "data_wait_s": 0.0}, 5)
    reporter.eval(1, bad, 8)
    reporter.close(SUMMARY)
    records = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] is None and records[0]["lr"] == 1e-3
    assert records[1]["eval_loss"] is None


def test_records_past_the_checkpoint_are_dropped_and_a_torn_line_too(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval_loss": 5.0}, {"note": "no step: kept"}, {"step": 1, "loss": 4.0},
             {"step": 2, "loss": 3.9}, {"step": 2, "eval_loss": 3.8},
             {"step": 2, "restart": 1, "merge_seconds": 0.1, "retention": 1.0},
             {"step": 3, "loss": 3.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    reporter = Reporter(path, 10, live=False)  # already appending, as when train() is handed a reporter
    drop_records_after(path, 2)  # the checkpoint of step 2 was saved after its eval, before its restart
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:5]
    reporter.step({"step": 3, "loss": 3.6, "lr": 0.1, "tokens": 1, "tokens_per_s": 1.0, "restarts": 1}, 1)
    reporter.close(SUMMARY)
    assert [json.loads(x).get("step") for x in path.read_text().splitlines()] == [0, None, 1, 2, 2, 3]
    drop_records_after(tmp_path / "absent.jsonl", 2)  # nothing to do


def reporter(tmp_path, total, schedule, width=80, live=False):
    console = Console(file=io.StringIO(), width=width, force_terminal=live, color_system=None)
    r = Reporter(tmp_path / "metrics.jsonl", total, console, live=live)
    r.start(0, 0, schedule)
    return r, console


def record(step, restarts, loss=5.123456, lr=1.234e-3, speed=123456.7):
    return {"step": step, "loss": loss, "lr": lr, "tokens": step * 1024, "tokens_per_s": speed, "restarts": restarts}


@pytest.mark.parametrize("total", [7, 360, 123_456, 10_000_000])
@pytest.mark.parametrize("width", [40, 80, 200])
def test_status_keeps_step_total_and_eta_within_the_width(tmp_path, total, width):
    r, _ = reporter(tmp_path, total, JaggedCosine(total, 20, 0.1, 60, 2, 60))
    r.step(record(total // 2, 3), None)
    text = r.status(width).plain
    assert len(text) < width
    assert text.startswith(f"{total // 2:,}/{total:,}") and "ETA " in text
    if width >= 80:
        assert "loss 5.1235" in text and ("restart 4/" in text or total < 360)  # 7 steps: no restart
    r.close(summary(steps=1, restarts=0, tokens=0, first_eval_loss=1.0, last_eval_loss=1.0, seconds=1.0))


def test_restart_count_and_countdown_are_exact_at_every_step(tmp_path):
    """warm start 60, cycles of 60, 360 steps: restarts before steps 121, 181, 241, 301 (none at the end)."""
    schedule = JaggedCosine(360, 20, 0.1, 60, 2, 60)
    r, _ = reporter(tmp_path, 360, schedule)
    restarts = 0
    for step in range(1, 361):
        if step > 1 and schedule.is_restart(step - 1):
            restarts += 1
            r.restart({"step": step - 1, "restart": restarts, "merge_seconds": 0.0, "retention": 1.0})
            after = r.restart_text()  # shown right after the restart, before the next step
            assert after == "restarts 4/4" if restarts == 4 else after == f"restart {restarts + 1}/4 in 60", after
        r.tick(step, restarts)
        text = r.restart_text()
        upcoming = [s for s in range(step, 360) if schedule.is_restart(s)]
        if upcoming:
            left = upcoming[0] - step
            assert text == (f"restart {restarts + 1}/4 now" if left == 0 else f"restart {restarts + 1}/4 in {left}")
        else:
            assert text == "restarts 4/4", step
    assert restarts == 4 and "in" not in r.status(80).plain  # the finished bar announces no restart


def test_live_status_is_drawn_on_a_terminal_and_plain_lines_are_not(tmp_path):
    r, console = reporter(tmp_path, 360, None, live=True)
    r.step(record(10, 0), None)
    r.display.refresh()
    r.close(summary(steps=10, restarts=0, tokens=10240, first_eval_loss=6.0, last_eval_loss=5.0, seconds=61.0))
    output = console.file.getvalue()
    assert "10/360" in output and "ETA" in output and "step 10/360:" not in output


def summary(**fields) -> RunSummary:
    return RunSummary(**{"train_loss": None, "tokens_per_s": None, "run_dir": Path("x"), "checkpoint": None,
                         "next_command": "", **fields})


def test_plain_line_every_record_and_summary_in_one_format(tmp_path):
    r, console = reporter(tmp_path, 360, JaggedCosine(360, 20, 0.1, 60, 2, 60))
    r.step(record(10, 0), None)
    r.close(summary(steps=360, restarts=4, tokens=368640, train_loss=3.21, first_eval_loss=8.35, last_eval_loss=4.5,
                    tokens_per_s=1022.0712, seconds=3725.0, run_dir=Path("runs/x"),
                    checkpoint=Path("runs/x/checkpoints/step-00000360"),
                    next_command="lean-relora export runs/x runs/x/hf"))
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("step 10/360: loss 5.1235, lr 1.23e-03, 123,457 tok/s, ETA ")
    assert lines[0].endswith(", restart 1/4 in 110 steps")
    assert lines[1] == "run summary"
    printed = {line[2:13].strip(): line[14:] for line in lines[2:]}  # "  key         value"
    assert printed["tokens"] == "368,640" and printed["tokens/s"] == "1,022 (average)"
    assert printed["train loss"] == f"3.2100 (perplexity {number(math.exp(3.21))}, last step)"
    assert printed["time"] == "1:02:05" and printed["next"] == "lean-relora export runs/x runs/x/hf"


@pytest.mark.parametrize("value,text", [(368640, "368,640"), (1022.0712, "1,022.1"), (6.20163, "6.2016"),
                                        (493.551, "493.55"), (0.98765, "0.98765"), (0.0, "0"), (12345.6, "12,346")])
def test_numbers_are_written_one_way(value, text):
    assert number(value) == text


def test_duration():
    assert duration(59.6) == "0:01:00" and duration(None) == "-:--:--" and duration(3 * 3600 + 7) == "3:00:07"
