"""The one-process path after data parallelism (distributed.py) came in, against the code before it: the same tiny
training run, alternately from this tree and from REF checked out into a temporary git worktree, many rounds, so
that both see the same machine state. Each run's figure is its loop's average tokens/s (the run summary's); the
ratio of the medians must stay >= 0.98.

    OMP_NUM_THREADS=1 .venv/bin/python bench/one_process.py [--ref 181fd56] [--rounds 6] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs the CLI of the tree given as argv[1], whatever lean_relora the environment has installed.
LAUNCH = ("import sys; tree = sys.argv.pop(1); sys.path.insert(0, tree); import lean_relora; "
          "assert lean_relora.__file__.startswith(tree), lean_relora.__file__; "
          "from lean_relora.cli.app import main; sys.argv[0] = 'lean-relora'; main()")


def tokens_per_second(tree: Path, run_dir: Path, steps: int) -> float:
    args = ["train", "--run-dir", str(run_dir), "--set", f"train.max_steps={steps}", "--set", "train.device=cpu",
            "--set", "relora.warm_start_steps=10", "--set", "relora.restart_every=20", "--set", "eval.every=0",
            "--set", "eval.batches=1", "--set", "checkpoint.every=0"]
    done = subprocess.run([sys.executable, "-c", LAUNCH, str(tree), *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return float(re.search(r"tokens/s\s+([\d,]+) \(average\)", done.stderr).group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", default="181fd56", help="the commit before data parallelism (the merge base)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.ref], check=True)
        try:
            speeds = {"before": [], "now": []}
            for round_ in range(args.rounds):
                order = [("before", before), ("now", ROOT)] if round_ % 2 == 0 else [("now", ROOT), ("before", before)]
                for name, tree in order:
                    speeds[name].append(tokens_per_second(tree, Path(tmp) / f"{name}-{round_}", args.steps))
                print(f"round {round_ + 1}: before {speeds['before'][-1]:,.0f} tok/s, now {speeds['now'][-1]:,.0f} "
                      "tok/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    ratio = statistics.median(speeds["now"]) / statistics.median(speeds["before"])
    print(f"median: before {statistics.median(speeds['before']):,.0f} tok/s, now "
          f"{statistics.median(speeds['now']):,.0f} tok/s; now / before = {ratio:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
