"""The record of what every restart merged: RUN_DIR/merges/step-NNNNNNNN.safetensors holds, for each ReLoRA layer,
the factors B and A (and the scale s) that the restart after that step folded into the base.

Their sum, plus the factors of a checkpoint, is the update of the ReLoRA phase up to that checkpoint, exactly,
whatever checkpoints `checkpoint.keep_last` pruned: `report --spectrum` measures it. A file holds r (in + out)
values per layer, in the factors' dtype (the tiny recipe: 2.4 MB per restart; a 1.3B model at rank 128 in bf16:
about 240 MB). A resumed run that redoes a restart writes the same file again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lean_relora.model.relora import ReLoRALinear

DIRECTORY = "merges"


def path_of(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / DIRECTORY / f"step-{step:08d}.safetensors"


def record(model: torch.nn.Module, run_dir: Path, step: int) -> Path:
    """Record the factors every ReLoRA layer of `model` is about to merge (call it before merging), atomically."""
    tensors, scales = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, ReLoRALinear):
            tensors[f"{name}.lora_B"] = module.lora_B.detach().cpu().contiguous()
            tensors[f"{name}.lora_A"] = module.lora_A.detach().cpu().contiguous()
            scales.add(module.scale)
    path = path_of(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={"step": str(step), "scale": repr(scales.pop() if scales else 1.0)})
    os.replace(tmp, path)
    return path


def recorded(run_dir: Path, before: int) -> list[Path]:
    """The merge files of the restarts before step `before`, oldest first (a checkpoint at step C holds the merges
    of the restarts before C; the restart at C comes after its save)."""
    directory = Path(run_dir) / DIRECTORY
    paths = sorted(directory.glob("step-*.safetensors")) if directory.is_dir() else []
    return [p for p in paths if int(p.stem.split("-")[1]) < before]


def accumulated(paths: list[Path], layer: str) -> torch.Tensor:
    """sum of s B A of `layer` over the merge files `paths`, in float64."""
    total = None
    for path in paths:
        with safe_open(path, framework="pt") as f:
            scale = float(f.metadata()["scale"])
            b, a = f.get_tensor(f"{layer}.lora_B").double(), f.get_tensor(f"{layer}.lora_A").double()
        total = scale * b @ a if total is None else total.addmm_(b, a, alpha=scale)
    return total
