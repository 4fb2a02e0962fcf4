"""Atomic JSON files for the GPU-window scripts (gpu_acceptance.py, preflight.py): a reader, or a run killed
mid-write, sees the old file or the new one, never half of one. No import beyond the standard library, so that a
broken torch or bitsandbytes cannot stop a script from writing down that it is broken."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the results readable by their writer alone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
