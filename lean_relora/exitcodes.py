"""How a process ends, as the number its parent sees: kept apart from outcome.py, which knows every error type of
the package, so that the modules below the command line (distributed.py's launcher) can name them without it."""

DONE, FAILED, BAD_INPUT, STOPPED, ABORTED = 0, 1, 2, 75, 130  # 75: EX_TEMPFAIL, stopped after a checkpoint
