"""Restart fidelity of the stored base: naive requantization vs the fp32 master (issue: restarts that keep what was
learned). For nf4, fp4 and int8, 20 consecutive merges of rank-16 updates of relative size 2e-4, 2e-3, 2e-2 into a
2048 x 2048 W_0 ~ N(0, 0.02); prints retention and error ratio (definitions in lean_relora/fidelity.py) and writes
results/fidelity.json.

    .venv/bin/python bench/fidelity.py [--size 2048] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lean_relora.tools.fidelity import simulate_restarts

SIZES = (2e-4, 2e-3, 2e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="W_0 is size x size")
    parser.add_argument("--seeds", type=int, default=3, help="independent matrices averaged per cell")
    parser.add_argument("--out", type=Path, default=Path("results/fidelity.json"))
    args = parser.parse_args()

    table = Table(title=f"20 restarts, rank 16, W_0 {args.size}x{args.size} ~ N(0, 0.02), mean of {args.seeds} seeds")
    for column in ("quant", "delta / |W|", "naive retention", "master retention", "naive error ratio",
                   "master error ratio", "master probe", "ms per merge (master)"):
        table.add_column(column, justify="right")
    rows = []
    for quant in ("nf4", "fp4", "int8"):
        for size in SIZES:
            cell = {}
            for keep_master in (False, True):
                runs = [simulate_restarts(quant, keep_master, size, shape=(args.size, args.size), seed=seed)
                        for seed in range(args.seeds)]
                rows += [asdict(r) for r in runs]
                cell[keep_master] = {key: statistics.mean(getattr(r, key) for r in runs)
                                     for key in ("retention", "error_ratio", "probe_retention", "seconds_per_merge")}
            table.add_row(quant, f"{size:g}", f"{cell[False]['retention']:.3f}", f"{cell[True]['retention']:.3f}",
                          f"{cell[False]['error_ratio']:.3f}", f"{cell[True]['error_ratio']:.3f}",
                          f"{cell[True]['probe_retention']:.3f}", f"{1000 * cell[True]['seconds_per_merge']:.1f}")
    Console(width=150).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
