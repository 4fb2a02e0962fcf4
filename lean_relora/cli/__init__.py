"""The command line: `lean-relora train | memory-estimate | prepare | export | eval | report`.

    app           the commands, a thin layer over functions the tests call directly
    errors        exit codes, one-line errors for bad input, a log file for a bug
    run_dir       a run directory: named, created, and removed again when a run's first input was bad
    launch        torchrun started as a library for --nproc N, and the free GPU memory asked without a CUDA context
"""

from lean_relora.cli.app import app, main

__all__ = ["app", "main"]
