"""A pretrained model read one tensor at a time, so host RAM never holds the whole model.

`from_pretrained` materialises every weight in host RAM first (a 7B model: 13.5 GB in bf16). Here the model is built
with its parameters on the meta device (buffers such as rotary frequencies are computed for real, they are small),
and each tensor is read from the safetensors shards through a memory map only when its module is filled: a ReLoRA
target is quantized on the training device as it arrives and its fp32 master written (master.py) before the next
is read; every other parameter goes straight to the training device. Peak host RAM while loading: one layer, plus
the parameters that stay on the CPU when the CPU is the training device.

Used when `model.pretrained` is a local directory of safetensors files and ReLoRA starts at once (no full-rank warm
start, which needs the dense model anyway); anything else loads through `from_pretrained`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lean_relora.recipe import Recipe, RecipeError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def streamable(pretrained: str) -> bool:
    """A local directory whose weights are safetensors (one file or an index of shards)."""
    path = Path(pretrained)
    return path.is_dir() and ((path / SINGLE).is_file() or (path / INDEX).is_file())


def streams(recipe: Recipe) -> bool:
    """Whether setup reads the recipe's pretrained model tensor by tensor: a local safetensors directory, and ReLoRA
    from the start (a full-rank warm start trains the dense model, which from_pretrained builds)."""
    return bool(recipe.model.pretrained) and not recipe.relora.warm_start_steps and streamable(
        recipe.model.pretrained)


class TensorSource:
    """The tensors of a safetensors checkpoint by name, each read (memory-mapped) on request: the model of a
    directory (one file or an index of shards), or the one file `single` in it."""

    def __init__(self, directory: Path, single: str = SINGLE):
        self.directory = directory = Path(directory)
        if single == SINGLE and (directory / INDEX).is_file():
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            with safe_open(directory / single, framework="pt") as f:
                self.files = {name: directory / single for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        # Opened per tensor: a shard kept open keeps every page read from it mapped, and counted in the RSS.
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def fill(self, prefix: str, module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
        """Give every meta parameter of `module` (named `prefix` in the model) its checkpoint value on `device`."""
        for name, param in list(module.named_parameters(recurse=True)):
            if param.device.type != "meta":
                continue
            key = f"{prefix}.{name}" if prefix else name
            if key not in self:
                raise RecipeError(f"model.pretrained = {str(self.directory)!r}: its safetensors files lack {key}, "
                                  "which the model's config needs; re-save the model with transformers")
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            value = self.get(key).to(device, dtype if param.is_floating_point() else param.dtype)
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta():
    """Modules built inside create their parameters on the meta device (no memory, no init); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_pretrained(directory: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, TensorSource]:
    """The pretrained model's architecture with every parameter on meta, and where its tensors are."""
    config = AutoConfig.from_pretrained(directory)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, TensorSource(Path(directory))


def fill_remaining(model: PreTrainedModel, source: TensorSource, device: torch.device | str,
                   dtype: torch.dtype) -> None:
    """Every parameter still on meta (all but the ReLoRA targets, which were filled as they were quantized), then
    the tied weights (a tied lm_head is not in the checkpoint)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if tied and module is head:
            continue
        own = [p for p in module.parameters(recurse=False) if p.device.type == "meta"]
        if own:
            source_module = nn.Module()  # fill only this module's own parameters, not its children's
            source_module._parameters = module._parameters
            source.fill(name, source_module, device, dtype)
    if tied:
        head.weight = model.get_input_embeddings().weight


class StateMismatch(ValueError):
    """A safetensors file whose tensors are not the model's state dict (names or shapes)."""


@torch.no_grad()
def load_state(model: nn.Module, source: TensorSource) -> None:
    """`model.load_state_dict` (strict) from `source`, read one tensor at a time: a real tensor is copied into in
    place, a meta one is replaced by the tensor read (parameters sharing one tensor, tied embeddings, stay shared).
    Host RAM beyond the model: one tensor."""
    state = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(state) - set(source.files)), sorted(set(source.files) - set(state))
    if missing or unexpected:
        raise StateMismatch(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    replaced: dict[int, torch.Tensor] = {}
    for key, current in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if id(current) in replaced:  # tied to a tensor already read
            value = replaced[id(current)]
        else:
            value = source.get(key)
            if value.shape != current.shape:
                raise StateMismatch(f"size mismatch for {key}: {tuple(value.shape)} in the file, "
                                    f"{tuple(current.shape)} in the model")
            if current.device.type != "meta":
                current.copy_(value)
                continue
            value = value.to(current.dtype)
            if isinstance(current, nn.Parameter):
                value = nn.Parameter(value, requires_grad=current.requires_grad)
            replaced[id(current)] = value
        if leaf in owner._parameters:
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value
