"""lean_relora.progress: metrics.jsonl is strict JSON and keeps one record per step across a resume."""

import json
import math

import pytest

from lean_relora.progress import Reporter, drop_records_after


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
    reporter.close({})
    records = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] is None and records[0]["lr"] == 1e-3
    assert records[1]["eval_loss"] is None


def test_records_past_the_checkpoint_are_dropped_and_a_torn_line_too(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval_loss": 5.0}, {"note": "no step: kept"}, {"step": 1, "loss": 4.0},
             {"step": 2, "loss": 3.9}, {"step": 2, "eval_loss": 3.8}, {"step": 2, "restart": 1, "merge_seconds": 0.1, "retention": 1.0},
             {"step": 3, "loss": 3.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    reporter = Reporter(path, 10, live=False)  # already appending, as when train() is handed a reporter
    drop_records_after(path, 2)  # the checkpoint of step 2 was saved after its eval, before its restart
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:5]
    reporter.step({"step": 3, "loss": 3.6, "lr": 0.1, "tokens": 1, "tokens_per_s": 1.0, "restarts": 1}, 1)
    reporter.close({})
    assert [json.loads(x).get("step") for x in path.read_text().splitlines()] == [0, None, 1, 2, 2, 3]
    drop_records_after(tmp_path / "absent.jsonl", 2)  # nothing to do
