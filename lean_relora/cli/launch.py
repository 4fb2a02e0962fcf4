"""Starting several ranks: torchrun called as a library, and what the launcher may ask of the GPU without holding it.

The ranks themselves (process group, DDP, owners of masters) are training/distributed.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lean_relora.cli.errors import STOPPED

SHUTDOWN_SECONDS = 900  # after a signal, how long torchrun lets the ranks finish their step and save before killing


def free_gpu_bytes(device: torch.device, trains_here: bool) -> int:
    """Free bytes of `device`. A process that will not train on it (the launcher of several ranks) asks in a
    short-lived child process: a CUDA context of its own would hold about 0.5 GiB of GPU 0 for the whole job, beside
    rank 0's."""
    if trains_here or torch.cuda.is_initialized():
        return torch.cuda.mem_get_info(device)[0]
    index = device.index if device.index is not None else 0
    ask = "import sys, torch; print(torch.cuda.mem_get_info(int(sys.argv[1]))[0])"
    done = subprocess.run([sys.executable, "-c", ask, str(index)], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def shutdown_timeout() -> list[str]:
    """torchrun's option for how long the ranks may take to save after a signal, where this torch has it: the torchrun
    of torch 2.11 (our GPU machine's) refuses it, and kills the ranks on its own schedule after forwarding a signal."""
    from torch.distributed.run import get_args_parser

    known = get_args_parser()._option_string_actions
    return ["--shutdown-timeout", str(SHUTDOWN_SECONDS)] if "--shutdown-timeout" in known else []


def launch(nproc: int, recipe: Path | None, overrides: list[str], run_dir: Path, max_steps: int | None,
           resume: str | None, force: bool) -> int:
    """Run `torchrun --standalone --nproc-per-node N -m lean_relora train ...` in this process (torch's launcher,
    called as a library) and return the job's exit code as one process would have it: 0 done, 75 stopped by a
    signal (torchrun passes it on to every rank, which finish their step and save), else the code of the first
    rank that failed (2 bad input, 1 failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = ["--standalone", "--nproc-per-node", str(nproc), *shutdown_timeout(),
               "-m", "lean_relora", "train", *([str(recipe)] if recipe else []),
               *(word for item in overrides for word in ("--set", item)), "--run-dir", str(run_dir)]
    command += ["--max-steps", str(max_steps)] if max_steps is not None else []
    command += ["--resume", resume] if resume is not None else []
    command += ["--force"] if force else []
    # torchrun would set one thread per rank and warn that it did; the cores of the host shared among the ranks
    # is the same choice, made without the warning.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(parse_args(command))
    except SignalException:
        return STOPPED
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1  # a negative code: killed by a signal
    return 0
