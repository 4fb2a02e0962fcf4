"""Using a trained run: rebuild its model from a checkpoint, export it as a plain Hugging Face model, evaluate it.

The export folds every ReLoRA layer into the dense layer it replaced (nn.Linear, or transformers' Conv1D), W + s B A, where W is the fp32 master copy when the run
kept one (relora.fidelity = master) and the dequantized base otherwise: the 4-bit codes are only a lossy view of the
master, so exporting from them would throw away precision the run paid for.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from lean_relora import checkpoint
from lean_relora.data import build_eval_data, document_positions
from lean_relora.loss import causal_lm_loss
from lean_relora.model import DTYPES
from lean_relora.recipe import Recipe
from lean_relora.relora import ReLoRALinear, wrap_model
from lean_relora.tokenizer import SAVED, saved_tokenizer, tokenizer_name
from lean_relora.train import autocast_context, resolve_device

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP16_MAX = 65504.0


class ExportError(ValueError):
    """Bad input to export or eval; the message is one line for the user."""


@dataclass
class Trained:
    model: nn.Module  # as it trained: quantized base + LoRA factors (or dense, before the warm start ended)
    recipe: Recipe
    path: Path  # the checkpoint it came from
    problems: list[str]  # damaged newer checkpoints that were skipped


def load_trained(source: str | Path, device: torch.device | str = "cpu") -> Trained:
    """The model of a checkpoint, or of a run's newest intact one, rebuilt from its config and recipe."""
    path, problems = checkpoint.resolve(source)
    recipe, state = checkpoint.saved_recipe(path), checkpoint.read_state(path)
    dtype = DTYPES[recipe.model.dtype]
    model = AutoModelForCausalLM.from_config(checkpoint.saved_config(path)).to(dtype)
    if state["relora"]:
        wrap_model(model, recipe.lora, keep_master=state["masters"], dtype=dtype, device=device)
    checkpoint.load_model_state(model.to(device), path)
    return Trained(model.eval(), recipe, path, problems)


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


def export_model(source: str | Path, out_dir: Path, dtype: str = "bf16") -> Trained:
    """Write a standard Hugging Face model directory (config, safetensors, tokenizer) of the merged model."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype}: must be one of {', '.join(EXPORT_DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: already exists and is not an empty directory; choose a new one")
    trained = load_trained(source)
    tokenizer = run_tokenizer(trained)
    model = trained.model
    for name in [n for n, m in model.named_modules() if isinstance(m, ReLoRALinear)]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, merged_layer(model.get_submodule(name)))  # one layer at a time
    if dtype == "fp16":
        peak = max(p.detach().abs().max().item() for p in model.parameters())
        if peak > FP16_MAX:
            raise ExportError(f"--dtype fp16: a weight of magnitude {peak:.3g} exceeds fp16's range; use bf16 or fp32")
    model.to(EXPORT_DTYPES[dtype])
    model.config.use_cache = True
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, out_dir)  # replaces at most an empty directory
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
    batches = data.eval_batches(recipe.train.micro_batch_size, recipe.eval.batches)
    losses = []
    for ids in batches:
        ids = ids.to(device)
        positions = document_positions(ids, data.eos_token_id) if recipe.data.document_mask else None
        with autocast_context(recipe, device):
            losses.append(causal_lm_loss(trained.model, ids, recipe.train.loss_chunk_tokens,
                                         position_ids=positions).float().item())
    loss = sum(losses) / len(losses)
    return {"checkpoint": str(trained.path), "step": checkpoint.read_state(trained.path)["train_state"]["step"],
            "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "tokens": sum(ids.numel() for ids in batches),
            "problems": trained.problems}
