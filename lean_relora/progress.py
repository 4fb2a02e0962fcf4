"""What a run shows and records: a rich progress bar on a terminal, plain lines elsewhere, and metrics.jsonl.

metrics.jsonl has one JSON object per line: a training record every `log.every` steps
    {"step", "loss", "lr", "tokens", "tokens_per_s", "restarts", "data_wait_s"}
an evaluation record at each evaluation
    {"step", "eval_loss", "eval_ppl", "tokens"}
and a restart record at each restart (retention: share of all merged updates the quantized base still holds)
    {"step", "restart", "merge_seconds", "retention"}.
It is strict JSON: a NaN or infinite number (a skipped step's loss) is written as null. After a resume, the records
the resumed run is about to write again are dropped first (drop_records_after), so each step has one record.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, track
from rich.table import Table


class Reporter:
    def __init__(self, metrics_path: Path, total_steps: int, console: Console | None = None, live: bool | None = None,
                 sinks: list = ()):
        self.console = console or Console(stderr=True)
        self.sinks = list(sinks)  # optional copies of every record (sinks.py: TensorBoard, W&B)
        self.live = self.console.is_terminal if live is None else live
        self.metrics = open(metrics_path, "a", encoding="utf-8")
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
                TextColumn("restart in {task.fields[to_restart]} (#{task.fields[restarts]})"),
                TextColumn("data wait {task.fields[wait]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, loss="-", lr="-", speed="-",
                                               to_restart="-", restarts=0, wait="-")
            self.progress.start()

    def step(self, record: dict, steps_to_restart: int) -> None:
        self._write(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], loss=f"{record['loss']:.3f}",
                                 lr=f"{record['lr']:.2e}", speed=f"{record['tokens_per_s']:,.0f}",
                                 to_restart=steps_to_restart, restarts=record["restarts"],
                                 wait=f"{record.get('data_wait_s', 0.0):.2f} s")

    def eval(self, step: int, loss: float, tokens: int) -> None:
        self._write({"step": step, "eval_loss": loss, "eval_ppl": _ppl(loss), "tokens": tokens})
        self.line(f"step {step}: eval loss {loss:.4f}, perplexity {_ppl(loss):.2f}")

    def restart(self, record: dict) -> None:
        self._write(record)
        self.line(f"step {record['step']}: restart {record['restart']} (merged in {record['merge_seconds']:.2f} s, "
                  f"cumulative retention {record['retention']:.3f})")

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)  # unbroken: paths and commands stay copyable

    def track(self, items, description: str):
        """Iterate over `items` (a sized iterable) with a bar of its own on a terminal, a line elsewhere."""
        if self.progress is None:
            self.line(f"{description}: {len(items):,} items")
            yield from items
            return
        self.progress.stop()  # rich shows one live display at a time
        try:
            yield from track(items, description=description, console=self.console, transient=True)
        finally:
            self.progress.start()

    def close(self, summary: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.metrics.close()
        for sink in self.sinks:
            sink.close()
        table = Table(title="run summary", show_header=False)
        for key, value in summary.items():
            table.add_row(key, f"{value:,.4f}" if isinstance(value, float) else str(value))
        self.console.print(table)

    def _write(self, record: dict) -> None:
        self.metrics.write(json_line(record))
        self.metrics.flush()
        for sink in self.sinks:
            sink.log(record)


def json_line(record: dict) -> str:
    """One strict JSON line: non-finite floats (which json.dumps would write as the non-JSON NaN) become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def drop_records_after(path: Path, step: int) -> None:
    """Cut metrics.jsonl before the first record a run resumed from the checkpoint of `step` writes again: a training
    or evaluation record of a later step, or a restart record from `step` on (a restart at step s happens after the
    checkpoint of step s), or a torn line (the kill came mid-write). Records of a run killed past its checkpoint would
    otherwise appear twice. Records are in step order, so all that follows goes too; a record without a step stays.
    Truncated in place, so a Reporter already appending to the file writes on at the new end."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        keep = 0
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a torn line
                break
            at = record.get("step") if isinstance(record, dict) else None
            redone = isinstance(at, int) and (at > step or at == step and "restart" in record)
            if redone or not line.endswith(b"\n"):
                break
            keep += len(line)
    os.truncate(path, keep)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
