"""Training-level restart fidelity: the embedded tiny CPU recipe, same seed and steps, trained with
  - an unquantized base (quant = none; the recipe's fp32, stricter than bf16): the reference,
  - an nf4 base with the fp32 master (the default),
  - an nf4 base requantized naively at each restart,
printing final eval losses and their gaps to the reference, and writing results/fidelity_train.json.

    .venv/bin/python bench/fidelity_train.py [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paper_ordering import run_method
from rich.console import Console
from rich.table import Table

VARIANTS = {
    "none (exact base)": ["lora.quant='none'"],
    "nf4 + fp32 master": ["lora.quant='nf4'", "relora.fidelity='master'"],
    "nf4 naive": ["lora.quant='nf4'", "relora.fidelity='naive'"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for all runs")
    parser.add_argument("--out", type=Path, default=Path("results/fidelity_train"))
    args = parser.parse_args()

    console = Console(width=150)
    results = {}
    for name, overrides in VARIANTS.items():
        run = run_method(name, args.overrides + overrides, args.out, console,
                         directory=name.split()[0] + ("-naive" if "naive" in name else ""))
        restarts = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        retention = [r["retention"] for r in restarts if "retention" in r]
        results[name] = {"last_eval_loss": run["eval_loss"], "seconds": run["seconds"],
                         "retention_at_restarts": retention}

    reference = results["none (exact base)"]["last_eval_loss"]
    table = Table(title="tiny_cpu recipe, same seed and steps: final eval loss by base storage")
    for column in ("base", "final eval loss", "gap to exact base", "retention at last restart", "seconds"):
        table.add_column(column, justify="right")
    for name, result in results.items():
        result["gap"] = result["last_eval_loss"] / reference - 1
        table.add_row(name, f"{result['last_eval_loss']:.4f}", f"{100 * result['gap']:+.2f}%",
                      f"{result['retention_at_restarts'][-1]:.3f}" if result["retention_at_restarts"] else "-",
                      f"{result['seconds']:.0f}")
    console.print(table)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    console.print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
