"""The paper's ordering at small scale: on the built-in corpus (the embedded tiny_cpu recipe), the same steps and
tokens for every method, compare final eval loss of full-rank training, LoRA, LoRA after a full-rank warm start, and
ReLoRA (nf4 base and unquantized base); writes results/paper_ordering/summary.json and keeps each run's directory
(metrics and checkpoints, for `lean-relora report RUN_DIR ... --spectrum`); then the update rank of one weight matrix
(singular values of W_end - W_start) for LoRA and ReLoRA from the same warm start. ReLoRA with relora.init =
"gradient" runs on the same token budget (its init passes included) and, apart, on the same steps.

    .venv/bin/python bench/paper_ordering.py [--steps 300] [--restart-every 120] [--only METHOD ...] [--set ...]

The recipe's schedule is kept (60 full-rank warm-start steps, a 2-step re-warm) except ReLoRA's cycle length: 120
steps here, so 2 cycles follow the warm start. bench/sweep.py measures how cycle length and re-warm move
ReLoRA at this scale.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lean_relora.recipe import load_recipe
from lean_relora.tools.spectrum import measure as spectrum
from lean_relora.training.loop import train
from lean_relora.training.progress import Reporter

NEVER = "relora.restart_every=1000000"  # LoRA: one cycle for the whole run


INIT_BATCHES = 2  # micro-batches per gradient init (each passed twice): 2% of the budget in all at 300 steps


def variants(steps: int, restart_every: int) -> dict[str, list[str]]:
    cycles = f"relora.restart_every={restart_every}"
    # Gradient init spends 2 x INIT_BATCHES micro-batch passes at the start of ReLoRA and at every restart, counted
    # in the run's tokens: that row runs fewer steps, so that its tokens do not exceed the others'.
    recipe = load_recipe(None, [f"train.max_steps={steps}", cycles])
    inits = 1 + max(0, steps - 1 - recipe.relora.warm_start_steps) // restart_every
    init_steps = math.ceil(inits * 2 * INIT_BATCHES / recipe.train.grad_accum_steps)
    gradient = [cycles, "relora.init='gradient'", f"relora.init_batches={INIT_BATCHES}"]
    return {
        "full-rank": [f"relora.warm_start_steps={steps}"],
        "LoRA": ["relora.warm_start_steps=0", NEVER],
        "LoRA + warm start": [NEVER],
        "ReLoRA (nf4 base)": [cycles],
        "ReLoRA (unquantized base)": [cycles, "lora.quant='none'"],
        "ReLoRA, gradient init": [*gradient, f"train.max_steps={steps - init_steps}"],
        "ReLoRA, gradient init, same steps": gradient,  # more tokens than the others: the init alone, not the budget
    }


def run_method(name: str, overrides: list[str], out: Path, console: Console, directory: str | None = None) -> dict:
    """Train the embedded recipe with `overrides` into out/<directory, by default the name made a directory name>;
    its final eval loss and counts."""
    recipe = load_recipe(None, overrides)
    directory = directory or name.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("+", "plus")
    run_dir = out / directory.replace(",", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    console.print(f"[bold]{name}[/]: {' '.join(overrides)}")
    summary = train(recipe, run_dir, Reporter(run_dir / "metrics.jsonl", recipe.train.max_steps, live=False))
    return {"eval_loss": summary.last_eval_loss, "restarts": summary.restarts, "tokens": summary.tokens,
            "seconds": summary.seconds, "run_dir": str(run_dir), "overrides": overrides}


# Perplexities of the paper's 130M-scale runs (Lialin et al., Table 2), for orientation only.
PAPER = {"full-rank": 23.65, "LoRA": 34.17, "LoRA + warm start": 25.46, "ReLoRA (nf4 base)": 25.04}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--restart-every", type=int, default=120, help="ReLoRA cycle length in steps")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods (full-rank and LoRA are "
                        "always run: they define the gap)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for all runs")
    parser.add_argument("--out", type=Path, default=Path("results/paper_ordering"))
    args = parser.parse_args()

    console = Console(width=150)
    common = [f"train.max_steps={args.steps}", "checkpoint.every=60", "checkpoint.keep_last=100", *args.overrides]
    chosen = {name: overrides for name, overrides in variants(args.steps, args.restart_every).items()
              if not args.only or name in (*args.only, "full-rank", "LoRA")}
    results = {name: run_method(name, common + overrides, args.out, console) for name, overrides in chosen.items()}

    full, lora = results["full-rank"]["eval_loss"], results["LoRA"]["eval_loss"]
    table = Table(title=f"tiny_cpu recipe, {args.steps} steps x {results['LoRA']['tokens'] // args.steps:,} tokens "
                        "for every method (unless its tokens say otherwise): final eval loss")
    for column in ("method", "eval loss", "perplexity", "share of the LoRA -> full-rank gap closed", "restarts",
                   "tokens", "paper 130M ppl"):
        table.add_column(column, justify="right")
    for name, result in results.items():
        closed = (lora - result["eval_loss"]) / (lora - full) if lora != full else float("nan")
        result["gap_closed"] = closed
        table.add_row(name, f"{result['eval_loss']:.4f}", f"{math.exp(result['eval_loss']):.1f}", f"{closed:.0%}",
                      str(result["restarts"]), f"{result['tokens']:,}", f"{PAPER[name]:.2f}" if name in PAPER else "-")
    console.print(table)

    # Update rank (the paper's central analysis): singular values of W_end - W_start of one matrix over the low-rank
    # phase, LoRA after the warm start against ReLoRA from the same warm start.
    ranks = Table(title="update rank of model.layers.0.mlp.down_proj, end of warm start -> end of run")
    for column in ("method", "LoRA rank", "non-zero singular values (> 1e-6 of the largest)",
                   "effective rank (> 1% of the largest)"):
        ranks.add_column(column, justify="right")
    for name in [n for n in ("LoRA + warm start", "ReLoRA (nf4 base)", "ReLoRA (unquantized base)",
                              "ReLoRA, gradient init") if n in results]:
        found = spectrum(results[name]["run_dir"], "model.layers.0.mlp.down_proj")
        normalized = found.singular_values / found.singular_values[0]
        results[name]["update_rank"] = {"nonzero": int((normalized > 1e-6).sum()), "effective": found.effective_rank}
        ranks.add_row(name, str(found.rank), str(int((normalized > 1e-6).sum())), str(found.effective_rank))
    console.print(ranks)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    console.print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
