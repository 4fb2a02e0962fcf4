"""Imported at the start of every rank the SIGTERM test launches (its folder is put on PYTHONPATH): once step
PAUSE_AFTER_STEP is done and recorded, each rank waits before the next step until the loop's own stop handler has
recorded SIGTERM, so the run stops after step PAUSE_AFTER_STEP + 1 whatever the machine's load (a run of 30 steps
could otherwise end before the signal arrives)."""

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time

PAUSE_AFTER_STEP = int(os.environ["PAUSE_AFTER_STEP"])


def _stop_recorded() -> bool:
    handler = signal.getsignal(signal.SIGTERM)  # the loop's StopRequest._handle while the run is armed
    return getattr(getattr(handler, "__self__", None), "signal", None) is not None


class _PauseTheLoop(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lean_relora.training.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            step = module.train_step

            def train_step(run):
                if run.state.step == PAUSE_AFTER_STEP:  # steps done; their records are written
                    while not _stop_recorded():
                        time.sleep(0.01)
                return step(run)

            module.train_step = train_step

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PauseTheLoop())
