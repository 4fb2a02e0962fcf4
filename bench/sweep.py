"""Hyperparameter sweeps at small scale, beside bench/paper_ordering.py: the embedded tiny_cpu recipe, the same 300
steps, seed and data for every run, one preset of variants per call (each under 10 minutes on 2 cores). Prints each
run's final eval loss and, when results/paper_ordering/summary.json holds runs of the same token budget, the share of
that table's LoRA -> full-rank gap it closes; writes results/sweep/<preset>/summary.json.

    .venv/bin/python bench/sweep.py [--preset schedule|lr-low|lr-high] [--set section.key=value ...]

schedule: ReLoRA (nf4 base) at cycle lengths 60 and 120 x LR re-warm of 10 and 2 steps after a restart, and LoRA
    after the same warm start with a 10-step re-warm (its one cycle starts with a re-warm too; the recipe's 2 steps
    are in the paper-ordering table).
lr-low, lr-high: every method of the paper-ordering table (full-rank, LoRA, LoRA + warm start, ReLoRA every 120) at
    half (1e-3) and twice (4e-3) the recipe's peak learning rate of 2e-3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paper_ordering import NEVER, run_method
from rich.console import Console
from rich.table import Table


def methods(lr: float) -> dict[str, list[str]]:
    at = f"optim.lr={lr}"
    return {
        f"full-rank, lr {lr:g}": ["relora.warm_start_steps=300", at],
        f"LoRA, lr {lr:g}": ["relora.warm_start_steps=0", NEVER, at],
        f"LoRA + warm start, lr {lr:g}": [NEVER, at],
        f"ReLoRA every 120, lr {lr:g}": ["relora.restart_every=120", at],
    }


def schedule() -> dict[str, list[str]]:
    runs = {f"ReLoRA every {every}, re-warm {rewarm}": [f"relora.restart_every={every}",
                                                        f"relora.restart_warmup_steps={rewarm}"]
            for rewarm in (10, 2) for every in (60, 120)}
    runs["LoRA + warm start, re-warm 10"] = [NEVER, "relora.restart_warmup_steps=10"]  # re-warm 2: paper_ordering
    return runs


PRESETS = {"schedule": schedule, "lr-low": lambda: methods(1e-3), "lr-high": lambda: methods(4e-3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="schedule")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for all runs")
    parser.add_argument("--out", type=Path, default=Path("results/sweep"))
    args = parser.parse_args()

    console = Console(width=150)
    out = args.out / args.preset
    common = ["train.max_steps=300", "checkpoint.every=1000000", *args.overrides]
    results = {name: run_method(name, common + overrides, out, console)
               for name, overrides in PRESETS[args.preset]().items()}

    gap = None
    reference = Path("results/paper_ordering/summary.json")
    if reference.is_file():
        ordering = json.loads(reference.read_text())
        if ordering["LoRA"]["tokens"] == next(iter(results.values()))["tokens"]:
            gap = ordering["LoRA"]["eval_loss"], ordering["full-rank"]["eval_loss"]
    title = f"tiny_cpu recipe, 300 steps, preset {args.preset}: final eval loss"
    if gap is not None:
        title += f"; gap of results/paper_ordering: LoRA {gap[0]:.4f} -> full-rank {gap[1]:.4f}"
    table = Table(title=title)
    for column in ("run", "eval loss", "restarts", "gap closed"):
        table.add_column(column, justify="right")
    for name, result in results.items():
        if gap is not None:
            result["gap_closed"] = (gap[0] - result["eval_loss"]) / (gap[0] - gap[1])
        table.add_row(name, f"{result['eval_loss']:.4f}", str(result["restarts"]),
                      f"{result['gap_closed']:.0%}" if gap is not None else "-")
    console.print(table)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    console.print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
