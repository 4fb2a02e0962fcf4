"""The host RAM a training process holds beyond its tensors: what memory-estimate's "process" row (host.PROCESS_BYTES)
stands for. Measured in a fresh process that sets up the tiny recipe and trains a few steps, so that it counts the
interpreter and libraries, the data pipeline and tokenizer, and the code pages and kernel caches the first forward,
backward and optimizer step bring in; the model's own tensors (tens of MiB here) are subtracted.

    .venv/bin/python bench/process_memory.py [--steps 3]

Prints VmRSS after imports, then after the steps (glibc's free memory handed back first) and the live tensor bytes
found through the garbage collector, and the difference against host.PROCESS_BYTES.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage the garbage collector reaches, each storage counted once."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own holds no bytes here
            continue
    return sum(storages.values())


def beyond_tensors() -> tuple[int, int, int]:
    """(VmRSS, live tensor bytes, VmRSS minus them) now, after handing freed memory back."""
    from lean_relora.sysmem import release_freed_memory

    gc.collect()
    release_freed_memory()
    now, tensors = rss(), live_tensor_bytes()
    return now, tensors, now - tensors


def measured(steps: int) -> dict:
    import torch

    from lean_relora.cli import app  # noqa: F401 (what the CLI process imports)
    from lean_relora.memory import estimate  # noqa: F401
    from lean_relora.recipe import load_recipe
    from lean_relora.training.loop import setup
    from lean_relora.training.step import train_step

    imports = rss()
    torch.set_num_threads(2)
    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.toml", ["relora.warm_start_steps=0"])  # ReLoRA steps
    with tempfile.TemporaryDirectory() as run_dir:
        run = setup(recipe, Path(run_dir))
        for _ in range(steps):
            train_step(run)
        now, tensors, process = beyond_tensors()
    return {"imports": imports, "rss": now, "tensors": tensors, "process": process}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measured(args.steps)))
        return
    child = subprocess.run([sys.executable, __file__, "--measure", "--steps", str(args.steps)], capture_output=True,
                           text=True, check=True)
    marks = json.loads(child.stdout.strip().splitlines()[-1])
    from lean_relora.memory.host_ram import PROCESS_BYTES

    print(f"VmRSS after imports {marks['imports'] / MIB:.0f} MiB; after setup and {args.steps} steps of the tiny "
          f"recipe {marks['rss'] / MIB:.0f} MiB, of which live tensors {marks['tensors'] / MIB:.0f} MiB: the process "
          f"beyond its tensors {marks['process'] / MIB:.0f} MiB (host.PROCESS_BYTES: {PROCESS_BYTES / MIB:.0f} MiB, "
          f"{marks['process'] / PROCESS_BYTES:.3f}x)")


if __name__ == "__main__":
    main()
