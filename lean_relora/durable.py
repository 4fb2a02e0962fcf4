"""Files that survive a crash: written, fsynced, and their directory entry fsynced. Checkpoints, prepared token
files and disk masters write through these, then rename into place, so a reader never sees half a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_synced(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    write_synced(path, text.encode("utf-8"))


def file_sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256, read in 4 MiB chunks; with `sync` the file is fsynced through the same handle."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def sync_dir(path: Path) -> None:
    """fsync a directory, so the names created or renamed in it are on disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
