"""Where each frozen base's fp32 master lives, and how a merge reads and writes it (docs/fidelity.md: why a master).

ram:  one fp32 tensor per layer in pageable host RAM (not pinned: torch's caching host allocator rounds every pinned
      block up to a power of two, and page-locking tens of GB starves the rest of a desktop).
disk: one raw fp32 file per layer and merge generation, RUN_DIR/master/gen-000003/<layer>.f32. A merge reads
      generation g through a memory map (one layer at a time: host RAM holds at most one layer's master) and writes
      generation g+1 to new files; a written file is never modified, only replaced by a rename. So a checkpoint
      hard-links the generation it needs instead of copying it, a kill at any moment (a merge included) leaves every
      checkpoint's master intact, and disk holds the current generation plus those of the checkpoints kept.

A master is used through read() (a CPU fp32 tensor; for disk a fresh memory map, released with the tensor) and
write(dense) (the merged weight, on any device).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import torch

from lean_relora.durable import file_sha256, write_synced

# RUN_DIR/master: the disk masters the run trains with (a checkpoint links its own: checkpoint.CHECKPOINT_MASTERS)
LIVE_MASTERS = "master"
GENERATION = re.compile(r"gen-(\d{6,})")


class RamMaster:
    """A layer's fp32 master in pageable host RAM."""

    in_memory = True

    def __init__(self, weight: torch.Tensor):
        self.tensor = weight.detach().to("cpu", torch.float32, copy=True)

    def read(self) -> torch.Tensor:
        return self.tensor

    def write(self, dense: torch.Tensor) -> None:
        if dense is not self.tensor:  # a merge on the CPU adds to the master in place
            self.tensor.copy_(dense)

    def restore(self, tensor: torch.Tensor | None = None, path: Path | None = None, generation: int = 0,
                sha256: str = "") -> None:
        self.tensor.copy_(tensor if tensor is not None else _map(path, self.tensor.shape))

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * 4


class DiskMaster:
    """A layer's fp32 master as an immutable file of its DiskMasters store, one per merge generation."""

    in_memory = False

    def __init__(self, store: DiskMasters, name: str, shape: torch.Size):
        self.store, self.name, self.shape = store, name, torch.Size(shape)
        self.generation, self.sha256 = -1, ""

    @property
    def path(self) -> Path:
        return self.store.path(self.name, self.generation)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * 4

    def read(self) -> torch.Tensor:
        return _map(self.path, self.shape)

    def write(self, dense: torch.Tensor, generation: int | None = None) -> None:
        """Write the next generation (or `generation`) of this master: temporary file, fsync, rename."""
        generation = self.generation + 1 if generation is None else generation
        path = self.store.path(self.name, generation)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = dense.detach().to("cpu", torch.float32).contiguous()
        view = memoryview(data.numpy()).cast("B")
        tmp = path.with_name(f".tmp-{path.name}")
        write_synced(tmp, view)
        os.replace(tmp, path)
        self.generation, self.sha256 = generation, hashlib.sha256(view).hexdigest()

    def restore(self, tensor: torch.Tensor | None = None, path: Path | None = None, generation: int = 0,
                sha256: str = "") -> None:
        """Become generation `generation` again: from a checkpoint's file (hard-linked back, no copy) or a tensor."""
        if tensor is not None:
            self.write(tensor, generation)
            return
        target = self.store.path(self.name, generation)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        tmp.unlink(missing_ok=True)
        link_or_copy(Path(path), tmp)
        os.replace(tmp, target)
        self.generation, self.sha256 = generation, sha256 or file_sha256(target)


class MappedMaster:
    """A checkpoint's disk master, read in place through a memory map: what a model rebuilt for export or eval keeps
    (no copy into a run's store, and nothing to write: such a model never merges)."""

    in_memory = False

    def __init__(self, shape: torch.Size):
        self.shape, self.path = torch.Size(shape), None

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * 4

    def read(self) -> torch.Tensor:
        return _map(self.path, self.shape)

    def write(self, dense: torch.Tensor) -> None:
        raise RuntimeError(f"{self.path}: a checkpoint's master is read-only; merge in a run built by train.setup")

    def restore(self, tensor: torch.Tensor | None = None, path: Path | None = None, generation: int = 0,
                sha256: str = "") -> None:
        if path is None:
            raise ValueError("a mapped master is restored from a checkpoint's file")
        self.path = Path(path)


class Master(Protocol):
    """An fp32 copy of one base weight that merges add into: RamMaster, DiskMaster or MappedMaster."""

    def read(self) -> torch.Tensor: ...

    def write(self, dense: torch.Tensor) -> None: ...

    @property
    def nbytes(self) -> int: ...


class MasterStore(Protocol):
    """Where wrap_model gets each layer's master: DiskMasters for a run on disk, tools.rebuild.CheckpointMasters for
    a model rebuilt from a checkpoint (None: each master in RAM)."""

    def create(self, name: str, weight: torch.Tensor) -> Master:
        """The master of layer `name`, holding `weight` (out x in)."""


class DiskMasters:
    """The disk masters of one run, under RUN_DIR/master."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.masters: list[DiskMaster] = []

    def path(self, name: str, generation: int) -> Path:
        return self.root / f"gen-{generation:06d}" / f"{name}.f32"

    def create(self, name: str, weight: torch.Tensor) -> DiskMaster:
        master = DiskMaster(self, name, weight.shape)
        master.write(weight, generation=0)
        self.masters.append(master)
        return master

    def collect(self) -> None:
        """Remove every generation directory that no master of this run uses now (after a merge, after a resume).
        A checkpoint's hard links keep its own files alive."""
        if not self.masters:  # a rank that owns no layer knows no current generation: it leaves them to the owners
            return
        current = {m.generation for m in self.masters}
        for directory in self.root.glob("gen-*"):
            match = GENERATION.fullmatch(directory.name)
            if match and int(match.group(1)) not in current:
                shutil.rmtree(directory, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied) where the filesystem allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _map(path: Path, shape: torch.Size) -> torch.Tensor:
    # MAP_PRIVATE: pages are read on demand and never written back; the map goes with the tensor.
    return torch.from_file(str(path), shared=False, size=torch.Size(shape).numel(), dtype=torch.float32).view(shape)
