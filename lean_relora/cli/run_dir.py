"""The run directory of a fresh `train`: created and checked before any work, and removed again when bad input
stops the run before it saved anything, so that a failed attempt leaves no debris in runs/ and the same --run-dir
can be given again."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from lean_relora.cli.errors import UserError


def new_run_dir(recipe_path: Path | None, root: Path = Path("runs")) -> Path:
    """runs/<recipe name>-<UTC time>: a fresh directory per run, so no run overwrites another."""
    stem = recipe_path.stem if recipe_path else "tiny_cpu"
    return root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class RunDir:
    """`RunDir(path).create()` makes the directory (and missing parents) and proves it writable; `discard()` removes
    what this object created, unless a checkpoint was saved into it meanwhile."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.created: Path | None = None  # the top-most directory this object made
        self.before: set[str] = set()  # what the directory held already

    def create(self) -> Path:
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"--run-dir {path}: is a file, not a directory; choose a directory")
        absolute = Path(os.path.abspath(path))  # ".." collapsed, so that the parents are the ones mkdir creates
        missing = [p for p in (absolute, *absolute.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.before = {p.name for p in path.iterdir()}
            tempfile.TemporaryFile(dir=path).close()  # root may create where it cannot write (a read-only mount)
        except OSError as e:
            self.discard()
            raise UserError(f"--run-dir {path}: cannot be created or written there ({e.strerror or e}); choose a "
                            "writable directory") from None
        return path

    def discard(self) -> None:
        from lean_relora.training.checkpoint import CHECKPOINTS

        if (self.path / CHECKPOINTS).exists():
            return  # a checkpoint is work to keep, whatever stopped the run afterwards
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.path.is_dir():
            for item in self.path.iterdir():
                if item.name not in self.before:
                    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
