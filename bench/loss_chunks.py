"""Tokens/s of the loop's training step with Hugging Face's loss and with the chunked loss (train.loss_chunk_tokens),
on the tiny recipe, steps interleaved in one process so that every variant sees the same machine state.

    .venv/bin/python bench/loss_chunks.py [--rounds 15] [--steps 3] [--chunks 0 1024 256] [--set KEY=VALUE ...]

Each variant is its own run of the recipe (same seed, same data); a round times `--steps` steps of each in turn. The
table gives the median tokens/s over rounds and its ratio to the first variant (0 = Hugging Face's loss).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lean_relora.recipe import load_recipe
from lean_relora.training.loop import setup
from lean_relora.training.step import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps of each variant per round")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256], help="train.loss_chunk_tokens values")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="recipe override, e.g. train.threads=2")
    parser.add_argument("--out", type=Path, default=Path("results/loss_chunks.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        runs = {}
        for chunk in args.chunks:
            recipe = load_recipe(None, [*args.overrides, f"train.loss_chunk_tokens={chunk}", "train.device='cpu'"])
            runs[chunk] = setup(recipe, Path(directory))
        for run in runs.values():  # warm-up: allocations, bnb's first calls
            train_step(run)
        speeds = {chunk: [] for chunk in runs}
        for _ in range(args.rounds):
            for chunk, run in runs.items():
                tokens = run.state.tokens
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(run)
                speeds[chunk].append((run.state.tokens - tokens) / (time.perf_counter() - start))

    recipe = next(iter(runs.values())).recipe
    base = statistics.median(speeds[args.chunks[0]])
    table = Table(title=f"Training step, tiny recipe ({recipe.train.micro_batch_size} x {recipe.data.seq_len} tokens "
                        f"per micro-batch), median of {args.rounds} interleaved rounds", title_justify="left")
    for column in ("train.loss_chunk_tokens", "tokens/s", f"vs {args.chunks[0]}"):
        table.add_column(column, justify="right")
    result = {}
    for chunk, values in speeds.items():
        median = statistics.median(values)
        result[chunk] = {"tokens_per_s": median, "ratio": median / base, "rounds": values}
        table.add_row(str(chunk) + (" (HF's loss)" if chunk == 0 else ""), f"{median:,.0f}", f"{median / base:.3f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
