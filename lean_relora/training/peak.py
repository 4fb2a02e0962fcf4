"""Every run's measured peak memory beside what memory-estimate predicted for its phase.

On CUDA: torch's max_memory_allocated and max_memory_reserved, plus the bytes bitsandbytes holds as paged optimizer
state (CUDA managed memory, outside torch's counters: optim.paged_bytes_held). `measured` = allocated + paged, which
is what memory/estimate.PhaseEstimate.allocated predicts (the trace's peak with the cuBLAS workspaces and paged
state; the CUDA context and the allocator's reserve, which memory-estimate's "GPU need" adds, are not in either). On
a CPU: the process's peak resident set (VmHWM, or getrusage's ru_maxrss) against the host-RAM estimate's peak
(host_ram.py) beyond the loading of the model, which happens before the first record. The estimates come in as
values (memory/estimate.phase_estimates, handed over by the command line): training sits below memory.

A record goes to metrics.jsonl after the first FIRST_STEPS steps of each phase (the full-rank warm start, the ReLoRA
cycles), after the first step past the first restart, at the warm start's last step, at each evaluation and at the
last step:
    {"step", "memory": "gpu", "phase", "peak_allocated", "peak_reserved", "paged", "measured", "estimated"}
    {"step", "memory": "host", "phase", "peak_rss", "measured", "estimated"}
(bytes; "estimated" null where the estimate could not be made, e.g. a tokenizer whose size is unknown beforehand).
Each covers the steps since the previous record: the counters are reset after each (the peak RSS where Linux allows
it, /proc/self/clear_refs). A measured peak more than EXCESS (and EXCESS_FLOOR) over the estimate is said in one
line, once per phase.
"""

from __future__ import annotations

import logging
import resource
import sys
from typing import Callable

import torch

from lean_relora.recipe import Recipe

GIB = 2**30
FIRST_STEPS = 2  # steps of a phase after which its first record is made
EXCESS = 0.10  # a measured peak this far over the estimate is reported...
EXCESS_FLOOR = 256 * 2**20  # ...if it is also this many bytes over: the tiny CPU recipe's peak RSS (0.7 GiB) is 30%
# over the host estimate (0.53), whose process share was measured at rest, not at a peak; a quarter GiB decides no fit

log = logging.getLogger(__name__)
WARM, RELORA = "full-rank warm start", "ReLoRA"
# (recipe, vocab, device, ranks) -> each phase's estimated peak, bytes: memory/estimate.phase_estimates
PeakEstimates = Callable[[Recipe, int, torch.device, int], dict[str, float]]


def measure(device: torch.device) -> dict:
    """The peak since the last reset, bytes, and its kind."""
    if device.type == "cuda":
        from lean_relora.training.optim import paged_bytes_held

        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        paged = paged_bytes_held()
        return {"memory": "gpu", "peak_allocated": allocated, "peak_reserved": reserved, "paged": paged,
                "measured": allocated + paged}
    rss = peak_rss()
    return {"memory": "host", "peak_rss": rss, "measured": rss}


def peak_rss() -> int:
    """The process's peak resident set, bytes: VmHWM (resettable), else getrusage (Linux reports KiB, macOS bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    from lean_relora.sysmem import release_freed_memory

    release_freed_memory()  # what setup freed but glibc kept is no part of the peak to come (nor of the estimate)
    try:  # Linux: "5" resets the peak RSS to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class PeakMemory:
    """Records the measured peak at the steps above and keeps each phase's largest for the summary."""

    def __init__(self, recipe, device: torch.device, estimates: dict[str, float], reporter):
        self.recipe, self.device, self.estimates, self.reporter = recipe, device, estimates, reporter
        self.peaks: dict[str, dict] = {}  # phase -> its largest record
        self.warned: set[str] = set()
        self.first_restart: int | None = None
        reset(device)

    def phase(self, step: int) -> str:
        return WARM if step <= self.recipe.relora.warm_start_steps else RELORA

    def due(self, step: int, end: int) -> bool:
        warm = self.recipe.relora.warm_start_steps
        every = self.recipe.eval.every
        return (step in (FIRST_STEPS, warm + FIRST_STEPS) or (warm and step == warm) or step == end
                or (self.first_restart is not None and step == self.first_restart + 1)
                or bool(every and step % every == 0))

    def restarted(self, step: int) -> None:
        if self.first_restart is None:
            self.first_restart = step

    def after_step(self, step: int, end: int) -> None:
        if self.due(step, end):
            self.record(step)

    def record(self, step: int) -> dict:
        phase = self.phase(step)
        record = {"step": step, "phase": phase, **measure(self.device), "estimated": self.estimates.get(phase)}
        reset(self.device)
        self.reporter.record(record)
        kept = self.peaks.get(phase)
        if kept is None or record["measured"] > kept["measured"]:
            self.peaks[phase] = record
        estimated = record["estimated"]
        over = record["measured"] - (estimated or 0)
        if estimated and over > max(EXCESS * estimated, EXCESS_FLOOR) and phase not in self.warned:
            self.warned.add(phase)
            self.reporter.line(excess_line(record))
        return record

    def summary(self) -> list[str]:
        """One line per phase: "ReLoRA: peak 3.21 GiB of GPU, estimated 3.30"."""
        return [summary_line(r) for phase in (WARM, RELORA) if (r := self.peaks.get(phase))]


def summary_line(record: dict) -> str:
    where = "of GPU (allocated + paged)" if record["memory"] == "gpu" else "of host RAM (peak RSS)"
    line = f"{record['phase']}: peak {record['measured'] / GIB:.2f} GiB {where}"
    if record["estimated"]:
        line += f", estimated {record['estimated'] / GIB:.2f}"
    return line


def excess_line(record: dict) -> str:
    over = record["measured"] / record["estimated"] - 1
    what = "GPU memory" if record["memory"] == "gpu" else "host RAM"
    return (f"step {record['step']}: the {record['phase']} used {record['measured'] / GIB:.2f} GiB of {what}, "
            f"{over:.0%} more than memory-estimate's {record['estimated'] / GIB:.2f}: please report it with this "
            "run's recipe.toml and metrics.jsonl")
