"""A trained model rebuilt from a checkpoint without ever being dense in host RAM: what export, eval and report use.

The model is built with its parameters on meta (model/streamed.py). Each ReLoRA target gets its stored form at once:
a placeholder layer of zeros is quantized (one dense layer at a time, released before the next), and the checkpoint's
codes, quantization statistics and LoRA factors are then copied over it tensor by tensor; every other parameter goes
from meta straight to the tensor read. A disk master (relora.master = "disk") stays where it is, the checkpoint's
file mapped on each read; masters that lived in RAM come back into RAM, as in the run. Peak host RAM: the model as it
trained (quantized base, LoRA factors, RAM masters if any) plus one dense layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lean_relora.model.build import DTYPES
from lean_relora.model.master import MappedMaster, RamMaster
from lean_relora.model.relora import wrap_model
from lean_relora.model.streamed import parameters_on_meta
from lean_relora.recipe import Recipe
from lean_relora.training import checkpoint


@dataclass
class Trained:
    model: nn.Module  # as it trained: quantized base + LoRA factors (or dense, before the warm start ended)
    recipe: Recipe
    checkpoint: checkpoint.Checkpoint  # the checkpoint it came from (path, step, damaged newer ones skipped)

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def problems(self) -> list[str]:
        return list(self.checkpoint.problems)


class CheckpointMasters:
    """The masters a rebuilt model keeps, in the shape wrap_model asks for them (`create`): a layer whose master the
    checkpoint holds as a file is mapped from it; any other gets a RAM master (filled from base.safetensors)."""

    def __init__(self, files: set[str]):
        self.files = files

    def create(self, name: str, weight: torch.Tensor) -> MappedMaster | RamMaster:
        # saved under the FrozenBase's name, layer.base
        if f"{checkpoint.CHECKPOINT_MASTERS}/{name}.base.f32" in self.files:
            return MappedMaster(weight.shape)
        return RamMaster(weight)


def placeholder(name: str, layer: nn.Module) -> None:
    """Zeros for a meta target layer's weight and bias, to be quantized and then overwritten by the checkpoint's."""
    for leaf, param in list(layer.named_parameters(recurse=False)):
        if param.device.type == "meta":
            layer._parameters[leaf] = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype),
                                                   requires_grad=False)


def load_trained(source: str | Path | checkpoint.Checkpoint, device: torch.device | str = "cpu") -> Trained:
    """The model of a checkpoint, or of a run's newest intact one, rebuilt from its config and recipe."""
    found = checkpoint.resolve(source)
    path, recipe, state = found.path, found.recipe, found.state
    dtype = DTYPES[recipe.model.dtype]
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(checkpoint.saved_config(path), dtype=dtype)
    if state["relora"]:
        files = set(found.meta["files"])
        wrap_model(model, recipe.lora, keep_master=state["masters"], dtype=dtype, master_store=CheckpointMasters(files),
                   materialize=placeholder, projected=recipe.relora.cycle == "projected")
    checkpoint.load_model_state(model, found)
    return Trained(model.to(device).eval(), recipe, found)
