"""Run by test_checkpoint.py beside it (not a test itself): SIGKILL a process that trains and writes checkpoints in a
loop, at random moments, and check after every kill that `latest` names a checkpoint that verifies and loads.

    python ckpt_kill_trials.py RUN_DIR TRIALS SEED     -> one JSON list on stdout, one record per trial

The writers are forked from this process after the imports and the setup (a fresh interpreter per trial would spend
seconds importing torch); torch runs single-threaded so that no OpenMP pool is forked.
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: helpers.py

from helpers import tiny_recipe  # noqa: E402

from lean_relora.training import checkpoint  # noqa: E402
from lean_relora.training.loop import setup  # noqa: E402
from lean_relora.training.step import train_step  # noqa: E402

run_dir, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
run = setup(tiny_recipe(steps=10**6), run_dir)
checkpoint.save(run, run_dir, keep_last=2)
root, delays, results = run_dir / checkpoint.CHECKPOINTS, random.Random(seed), []
for trial in range(trials):
    run.state.step = (trial + 1) * 1000  # every writer counts from a step of its own
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                train_step(run)
                checkpoint.save(run, run_dir, keep_last=2)
        finally:
            os._exit(1)
    time.sleep(delays.uniform(0.02, 0.4))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    record = {"trial": trial, "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith("."))}
    try:
        pointer = (root / checkpoint.LATEST).read_text().strip()
        checkpoint.verify(root / pointer)
        found, problems = checkpoint.find_latest(run_dir)
        checkpoint.restore(run, checkpoint.Checkpoint.read(found))
        record.update(ok=True, latest=pointer, found=found.name, problems=problems)
    except Exception as e:  # reported, not raised: the test shows every trial
        record.update(ok=False, error=f"{type(e).__name__}: {e}")
    results.append(record)
print(json.dumps(results))
