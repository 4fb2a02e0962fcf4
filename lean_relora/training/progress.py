"""What a run shows and records: a one-line status on a terminal, plain lines elsewhere, metrics.jsonl, a summary.

metrics.jsonl has one JSON object per line: a training record every `log.every` steps
    {"step", "loss", "lr", "tokens", "tokens_per_s", "restarts", "data_wait_s"}
an evaluation record at each evaluation
    {"step", "eval_loss", "eval_ppl", "tokens"}
and a restart record at each restart (retention: share of all merged updates the quantized base still holds)
    {"step", "restart", "merge_seconds", "retention"},
and memory records of the measured peak beside the estimate (peak.py)
    {"step", "memory", "phase", "measured", "estimated", ...}.
It is strict JSON: a NaN or infinite number (a skipped step's loss) is written as null. After a resume, the records
the resumed run is about to write again are dropped first (drop_records_after), so each step has one record.

Without a terminal (CI, nohup, a scheduler's log) every training record is also printed as a plain line, so a log
shows the loss between evaluations.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.progress import track
from rich.text import Text

METRICS = "metrics.jsonl"  # in the run directory
MIN_BAR = 6  # columns: a narrower bar is dropped
MAX_BAR = 30  # columns


def number(value) -> str:
    """The one way numbers are written: integers grouped (368,640), other numbers to 5 significant digits
    (6.2016, 493.55, 1,022.1), never in exponent notation."""
    if isinstance(value, int) or not math.isfinite(value):
        return f"{value:,}" if isinstance(value, int) else str(value)
    digits = 4 - math.floor(math.log10(abs(value))) if value else 0
    return f"{value:,.{min(max(digits, 0), 6)}f}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@dataclass(frozen=True)
class RunSummary:
    """How a run ended: what train() returns, the summary prints, and the command line reads its exit code from."""

    steps: int  # optimizer steps done
    restarts: int  # merges done
    tokens: int  # tokens trained on
    train_loss: float | None  # the last step's loss (None: no step ran in this process)
    first_eval_loss: float
    last_eval_loss: float
    tokens_per_s: float | None  # average over this process's steps
    seconds: float  # wall time of the whole call, setup included
    run_dir: Path
    checkpoint: Path | None  # the checkpoint the run ended with
    next_command: str  # what to run next: resume, or export
    skipped_steps: int = 0  # steps skipped for a NaN/inf loss or gradient
    stopped_by: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run (exit code 75)
    peak_memory: tuple[str, ...] = ()  # per phase: the measured peak beside the estimate (peak.py)


class Reporter:
    def __init__(self, metrics_path: Path, total_steps: int, console: Console | None = None, live: bool | None = None,
                 sinks: list = ()):
        self.console = console or Console(stderr=True)
        self.sinks = list(sinks)  # optional copies of every record (sinks.py: TensorBoard, W&B)
        self.live = self.console.is_terminal if live is None else live
        self.metrics = open(metrics_path, "a", encoding="utf-8")
        self.total = total_steps
        self.step_now, self.restarts, self.schedule, self.restarts_total = 0, 0, None, 0
        self.restarted_at = None  # the step after which the latest restart happened
        self.loss = self.lr = self.speed = self.wait = None  # wait: seconds the last steps waited for data
        self.started: tuple[float, int] | None = None  # (time, step) when the loop began: the ETA's baseline
        self.display = Live(get_renderable=self.status, console=self.console, auto_refresh=True,
                            refresh_per_second=2, transient=False) if self.live else None
        if self.display is not None:
            self.display.start()

    def start(self, step: int, restarts: int, schedule=None) -> None:
        """The loop begins at `step`; `schedule` (a JaggedCosine) tells when the restarts come."""
        self.started, self.step_now = (time.perf_counter(), step), step
        self.restarts, self.schedule = restarts, schedule
        # A restart due at the last step never happens: the run ends first.
        self.restarts_total = sum(1 for s in range(1, self.total) if schedule.is_restart(s)) if schedule else 0

    def tick(self, step: int, restarts: int) -> None:
        """Called after every step: the status counts steps and restarts exactly, not only at logged steps."""
        self.step_now, self.restarts = step, restarts
        self._refresh()

    def step(self, record: dict, steps_to_restart: int | None = None) -> None:
        self._write(record)
        self.tick(record["step"], record["restarts"])
        self.loss, self.lr, self.speed = record["loss"], record["lr"], record["tokens_per_s"]
        self.wait = record.get("data_wait_s")
        if self.display is None:
            fields = [f"loss {number(self.loss)}", f"lr {self.lr:.2e}", f"{number(round(self.speed))} tok/s",
                      f"ETA {duration(self.eta())}"]
            if (self.wait or 0) >= 0.01:  # the steps waited for data: worth a word, else noise
                fields.append(f"data wait {self.wait:.2f} s")
            restart = self.restart_text(long=True)
            self.line(f"step {number(self.step_now)}/{number(self.total)}: {', '.join(fields)}"
                      + (f", {restart}" if restart else ""))

    def eval(self, step: int, loss: float, tokens: int) -> None:
        self._write({"step": step, "eval_loss": loss, "eval_ppl": ppl(loss), "tokens": tokens})
        self.line(f"step {step}: eval loss {number(loss)}, perplexity {number(ppl(loss))}")

    def restart(self, record: dict) -> None:
        self._write(record)
        self.restarts, self.restarted_at = record["restart"], record["step"]
        self._refresh()
        init = (f", A from the gradient in {record['init_seconds']:.2f} s over {record['init_tokens']:,} tokens"
                if "init_seconds" in record else "")
        self.line(f"step {record['step']}: restart {record['restart']} "
                  f"(merged in {record['merge_seconds']:.2f} s{init}, "
                  f"cumulative retention {record['retention']:.3f})")

    def record(self, record: dict) -> None:
        """Another kind of record for metrics.jsonl (peak.py's memory records)."""
        self._write(record)

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)  # unbroken: paths and commands stay copyable

    def track(self, items, description: str):
        """Iterate over `items` (a sized iterable) with a bar of its own on a terminal, a line elsewhere."""
        if self.display is None:
            self.line(f"{description}: {len(items):,} items")
            yield from items
            return
        self.display.stop()  # rich shows one live display at a time
        try:
            yield from track(items, description=description, console=self.console, transient=True)
        finally:
            self.display.start()

    # ------------------------------------------------------------------------------------------- status

    def eta(self) -> float | None:
        if self.started is None or self.step_now <= self.started[1]:
            return None
        elapsed = time.perf_counter() - self.started[0]
        return elapsed / (self.step_now - self.started[1]) * (self.total - self.step_now)

    def restart_text(self, long: bool = False) -> str:
        """"restart 2/4 in 13" (the next restart and the steps left before it), "restarts 4/4" once none is left
        before the end, "" for a run without restarts."""
        total = self.restarts_total
        if total == 0:
            return ""
        # The restart due at a step happens before the next one runs: at that step it is 0 steps away.
        pending = self.schedule.is_restart(self.step_now) and self.restarted_at != self.step_now
        left = 0 if pending else self.schedule.steps_to_restart(self.step_now)
        if self.step_now + left >= self.total:
            return f"restarts {self.restarts}/{total}"
        if left == 0:
            return f"restart {self.restarts + 1}/{total} now"
        return f"restart {self.restarts + 1}/{total} in {left}" + (" steps" if long else "")

    def status(self, width: int | None = None) -> Text:
        """The terminal's status line, fitted to `width` columns (default: the console's): step/total and the ETA
        always; then the loss, the restart, tokens/s, the learning rate and the bar, as far as they fit."""
        width = (width or self.console.width) - 1  # the last column would wrap on some terminals
        head, tail = f"{number(self.step_now)}/{number(self.total)}", f"ETA {duration(self.eta())}"
        parts = {"loss": f"loss {number(self.loss)}" if self.loss is not None else "",
                 "restart": self.restart_text(),
                 "speed": f"{number(round(self.speed))} tok/s" if self.speed is not None else "",
                 "lr": f"lr {self.lr:.2e}" if self.lr is not None else "",
                 "wait": f"data wait {self.wait:.2f} s" if (self.wait or 0) >= 0.01 else ""}
        kept = [name for name in parts if parts[name]]  # in the order they are given up, last first

        def length(names):
            return len(" ".join([head, *(parts[n] for n in names), tail]))

        while kept and length(kept) > width:
            kept.pop()
        bar = min(MAX_BAR, width - length(kept) - 1)  # the bar takes what the numbers leave
        line = Text(head, style="bold")
        if bar >= MIN_BAR:
            done = round(bar * min(self.step_now / max(self.total, 1), 1.0))
            line.append(" ")
            line.append("━" * done, style="magenta")
            line.append("━" * (bar - done), style="grey23")
        for name in ("loss", "lr", "speed", "wait", "restart"):
            if name in kept:
                line.append(" " + parts[name])
        line.append(" " + tail, style="cyan")
        return line

    # ------------------------------------------------------------------------------------------- summary

    def close(self, summary: RunSummary) -> None:
        """Stop the status line and print the summary, one `key  value` line each, so that its paths and the next
        command stay copyable at any width."""
        if self.display is not None:
            self.display.stop()
            self.display = None
        self.metrics.close()
        for sink in self.sinks:
            sink.close()
        s = summary
        rows = [("steps", f"{number(s.steps)} of {number(self.total)}"), ("restarts", number(s.restarts)),
                ("tokens", number(s.tokens))]
        if s.train_loss is not None:
            rows.append(("train loss", f"{number(s.train_loss)} (perplexity {number(ppl(s.train_loss))}, last step)"))
        rows.append(("eval loss", f"{number(s.last_eval_loss)} (perplexity {number(ppl(s.last_eval_loss))}; at the "
                                  f"start {number(s.first_eval_loss)})"))
        if s.tokens_per_s is not None:
            rows.append(("tokens/s", f"{number(round(s.tokens_per_s))} (average)"))
        rows.append(("time", duration(s.seconds)))
        rows += [("memory", line) for line in s.peak_memory]  # peak.py: measured beside estimated, per phase
        if s.skipped_steps:
            rows.append(("skipped steps", number(s.skipped_steps)))
        if s.stopped_by:
            rows.append(("stopped by", s.stopped_by))
        rows.append(("run dir", str(s.run_dir)))
        if s.checkpoint:
            rows.append(("checkpoint", str(s.checkpoint)))
        if s.next_command:
            rows.append(("next", s.next_command))
        self.line("run summary")
        for key, value in rows:
            self.line(f"  {key:<11} {value}")

    def _refresh(self) -> None:
        if self.display is not None:
            self.display.refresh()  # now, not at the next tick of the display's clock: the counts stay exact

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


def command(*words) -> str:
    """A shell command with each word quoted as needed, to copy from the summary."""
    return " ".join(shlex.quote(str(w)) for w in words)
