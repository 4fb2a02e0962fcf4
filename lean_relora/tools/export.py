"""Using a trained run: export it as a plain Hugging Face model, evaluate it (rebuild.py rebuilds its model).

The export folds every ReLoRA layer into the dense layer it replaced (nn.Linear, or transformers' Conv1D), W + s B A,
where W is the fp32 master copy when the run kept one (relora.fidelity = master) and the dequantized base otherwise:
the 4-bit codes are only a lossy view of the master, so exporting from them would throw away precision the run paid
for. It is written shard by shard (hf_shards.py)
one merged layer at a time, so host RAM holds the model as it trained, one merged layer and one shard, never the
dense model (a 7B one: 13.5 GB in bf16, 28 GB in fp32).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D
from transformers.utils.hub import convert_file_size_to_int

from lean_relora.data.packing import build_eval_data
from lean_relora.data.tokenizer import SAVED, saved_tokenizer, tokenizer_name
from lean_relora.model.relora import ReLoRALinear
from lean_relora.sysmem import release_freed_memory
from lean_relora.tools.hf_shards import ShardWriter
from lean_relora.tools.rebuild import Trained, load_trained
from lean_relora.training.step import eval_loss, resolve_device

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP16_MAX = 65504.0
MAX_SHARD_SIZE = "2GB"  # host RAM the export holds for the shard being assembled


class ExportError(ValueError):
    """Bad input to export or eval; the message is one line for the user."""


def run_tokenizer(trained: Trained):
    """The run's tokenizer: the copy saved in its directory (RUN_DIR/tokenizer, beside RUN_DIR/checkpoints), so that
    neither a hub nor the pretrained model's directory is needed; a run made before such copies existed falls back
    to the tokenizer its recipe names."""
    run_dir = trained.path.parent.parent
    saved = saved_tokenizer(run_dir)
    if saved is not None:
        return saved
    name = tokenizer_name(trained.recipe.data, trained.recipe.model.pretrained)
    if name == "bpe":
        raise ExportError(f"{run_dir / SAVED}: the run's trained tokenizer is missing; keep the checkpoint inside its "
                          "run directory")
    return AutoTokenizer.from_pretrained(name)


@torch.no_grad()
def merged_layer(layer: ReLoRALinear) -> nn.Module:
    """The dense layer ReLoRA replaced, holding W + s B A: nn.Linear, or Conv1D (W^T stored) for a Conv1D. fp32, W
    from the master copy where there is one."""
    base = layer.base
    weight = base.master.read().clone() if base.master is not None else base.dequantize().cpu()
    weight.addmm_(layer.lora_B.detach().cpu().float(), layer.lora_A.detach().cpu().float(), alpha=layer.scale)
    bias = None if base.bias is None else nn.Parameter(base.bias.detach().cpu().float())
    with torch.device("meta"):  # allocated and initialised for nothing otherwise: the tensors are replaced below
        if layer.transposed:
            merged = Conv1D(base.out_features, base.in_features)
        else:
            merged = nn.Linear(base.in_features, base.out_features, bias=bias is not None)
    merged.weight = nn.Parameter(weight.t().contiguous() if layer.transposed else weight)
    merged.bias = bias if bias is not None or not layer.transposed else nn.Parameter(torch.zeros(base.out_features))
    return merged


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the merged model's state dict in its order, each ReLoRA layer merged (fp32) when its turn
    comes. A tensor under several names (tied embeddings) comes once, under its first name, as save_pretrained writes
    it (transformers ties the others back on loading)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ReLoRALinear)}
    merged, storages = set(), set()
    for key, value in model.state_dict().items():
        owner = next((p for p in _prefixes(key) if p in layers), None)
        if owner is not None:
            if owner not in merged:
                merged.add(owner)
                for leaf, tensor in merged_layer(layers[owner]).state_dict().items():
                    yield f"{owner}.{leaf}", tensor
            continue
        storage = value.untyped_storage().data_ptr()
        if value.numel() and storage in storages:
            continue
        storages.add(storage)
        yield key, value.detach().cpu()


def _prefixes(key: str) -> Iterator[str]:
    parts = key.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def shard_bytes(max_shard_size: str | int) -> int:
    try:
        size = int(max_shard_size) if str(max_shard_size).isdigit() else convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = 0
    if not isinstance(size, int) or size <= 0:
        raise ExportError(f"--max-shard-size {max_shard_size}: give a size such as 2GB, 500MB or a number of bytes")
    return size


def export_model(source: str | Path, out_dir: Path, dtype: str = "bf16",
                 max_shard_size: str | int = MAX_SHARD_SIZE) -> Trained:
    """Write a standard Hugging Face model directory (config, sharded safetensors, tokenizer) of the merged model."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype}: must be one of {', '.join(EXPORT_DTYPES)}")
    max_bytes = shard_bytes(max_shard_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: already exists and is not an empty directory; choose a new one")
    trained = load_trained(source)
    tokenizer = run_tokenizer(trained)
    model, export_dtype = trained.model, EXPORT_DTYPES[dtype]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        shards = ShardWriter(tmp, max_bytes)
        for name, tensor in merged_tensors(model):
            if tensor.is_floating_point():
                if dtype == "fp16":
                    peak = tensor.abs().max().item() if tensor.numel() else 0.0
                    if peak > FP16_MAX:
                        raise ExportError(f"--dtype fp16: a weight of magnitude {peak:.3g} exceeds fp16's range; "
                                          "use bf16 or fp32")
                tensor = tensor.to(export_dtype)
            shards.add(name, tensor)
            del tensor
            release_freed_memory()
        shards.close()
        config = copy.deepcopy(model.config)
        config.dtype = str(export_dtype).split(".")[1]  # as save_pretrained records it
        config.architectures = [type(model).__name__]
        config.use_cache = True
        config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, out_dir)  # replaces at most an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return trained


@torch.no_grad()
def evaluate_checkpoint(source: str | Path, data: str | None = None) -> dict:
    """Loss and perplexity on the run's eval split, or on the held-out split of another `data` source, computed with
    the model as it trained (quantized base), as the run's own evaluations were."""
    trained = load_trained(source)
    recipe, device = trained.recipe, resolve_device(trained.recipe.train.device)
    trained.model.to(device)
    cfg = recipe.data if data is None else dataclasses.replace(recipe.data, source=data)
    data = build_eval_data(cfg, run_tokenizer(trained))
    loss = eval_loss(trained.model, recipe, device, data)
    tokens = sum(ids.numel() for ids in data.eval_batches(recipe.train.micro_batch_size, recipe.eval.batches))
    return {"checkpoint": str(trained.path), "step": trained.checkpoint.step,
            "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "tokens": tokens, "problems": trained.problems}
