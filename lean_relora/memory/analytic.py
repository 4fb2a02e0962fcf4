"""Peak GPU bytes of a recipe from formulas, by component: the check on the trace (memory/trace.py), and the part of
the peak that does not grow with the micro-batch (estimate.largest_micro_batch).

Also the model's sizes as the estimate sees them: a pretrained model's from its config alone, and the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from transformers.pytorch_utils import Conv1D

from lean_relora.memory.trace import uses_autocast
from lean_relora.model.build import architecture, build_model, pretrained_config, sizes
from lean_relora.model.gradinit import sketch_bytes
from lean_relora.model.relora import target_modules
from lean_relora.recipe import Recipe, RecipeError

GIB = 2**30
BNB_OPTIM_BLOCK = 256  # elements per absmax of bnb's 8-bit optimizer state
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit optimizer state in bnb


def target_shapes(recipe: Recipe, vocab_size: int) -> list[tuple[int, int]]:
    """(out, in) of every layer that ReLoRA wraps, from a meta-device model (no memory, no init, no weights read)."""
    config = architecture(recipe.model, vocab_size)
    with torch.device("meta"):
        model = build_model(replace(recipe.model, gradient_checkpointing=False), vocab_size, recipe.data.seq_len,
                            config=config)
    # Conv1D stores its weight as (in, out)
    return [tuple(m.weight.shape[::-1] if isinstance(m, Conv1D) else m.weight.shape)
            for _, m in target_modules(model, recipe.lora.targets)]


def with_model_sizes(recipe: Recipe) -> Recipe:
    """The recipe with a pretrained model's own sizes (from its config alone) in place of model.*'s, which describe
    the random LLaMA built without one; unchanged without model.pretrained."""
    if not recipe.model.pretrained:
        return recipe
    return replace(recipe, model=replace(recipe.model, **sizes(pretrained_config(recipe.model.pretrained))))


def base_bytes(numel: int, rows: int, quant: str, blocksize: int, double_quant: bool, dtype_bytes: int) -> int:
    """Exact device bytes of one stored base weight (bnb's layouts)."""
    if quant in ("nf4", "fp4"):
        blocks = math.ceil(numel / blocksize)
        if not double_quant:
            return math.ceil(numel / 2) + 4 * blocks + 4 * 16
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4
    if quant == "int8":
        return numel + 4 * rows
    return numel * dtype_bytes


def adam_state_bytes(numel: int, optimizer: str, dtype_bytes: int) -> int:
    if optimizer == "adamw":
        return 2 * numel * dtype_bytes  # torch keeps exp_avg and exp_avg_sq in the parameter's dtype
    if numel < BNB_MIN_8BIT:
        return 8 * numel
    return 2 * numel + 8 * math.ceil(numel / BNB_OPTIM_BLOCK)


def analytic(recipe: Recipe, vocab_size: int, phase: str = "relora", micro_batch_size: int | None = None,
             autocast: bool | None = None) -> dict[str, int]:
    """Peak device bytes by component, from the model's sizes.

    Activations are what HF LLaMA saves for backward, in bytes per token and decoder layer, with a the activation
    dtype's size (2 under bf16 autocast) and kv the key/value width (other architectures get the same formula: an
    approximation, which the trace checks):
        two RMSNorms 2 (4h + 2ah)   fp32 input copy, normalized and weighted outputs
        attention    a (3h + 2kv)   rotated q and k, v, attention output and its contiguous copy (minus the norm's)
        MLP          4af            gate, SiLU(gate), up, their product
        LoRA         nar            the r-wide middle of each of the n targets per layer (7 in LLaMA)
    With gradient checkpointing only each block's input (h, in the model's dtype) is kept, plus one block while it
    is recomputed and back-propagated, which happens once the loss buffers are freed. Hugging Face's loss keeps fp32
    log-probabilities and, in backward, their gradient and the logits' (4 + 4 + 4 bytes per vocabulary entry and
    token, plus the bf16 logits under autocast); the chunked loss (train.loss_chunk_tokens) holds that of one chunk
    only (4 + 4 bytes), plus 12 bytes per token, so its buffers can be smaller than the last block's backward, which
    then takes their place. The peak is taken at the start of
    backward: all activations, the loss buffers, and the gradients that exist then (all of them from the second
    micro-batch of an accumulated step on, else lm_head's, which backward computes first).
    """
    m, lora = recipe.model, recipe.lora
    b = micro_batch_size or recipe.train.micro_batch_size
    tokens, h, f, r, layers = b * recipe.data.seq_len, m.hidden_size, m.intermediate_size, lora.rank, m.num_layers
    kv = h * (m.num_kv_heads or m.num_heads) // m.num_heads
    w = 2 if m.dtype == "bf16" else 4  # bytes of a stored weight
    a = 2 if (uses_autocast(recipe) if autocast is None else autocast) else w  # bytes of an activation
    shapes = target_shapes(recipe, vocab_size)
    relora = phase == "relora"
    head = vocab_size * h
    norms = (2 * layers + 1) * h
    embeddings = head * (1 if m.tie_embeddings else 2)
    if relora:  # as set_trainable decides: a tied lm_head is the embedding and trains with it
        lm_head_trains = lora.train_embeddings if m.tie_embeddings else lora.train_lm_head
        full_rank = head * lora.train_embeddings + head * lm_head_trains * (not m.tie_embeddings)
        full_rank += norms * lora.train_norms
        # relora.cycle = "projected": A (r x in) is frozen, so only B (out x r) has a gradient and moments.
        projected = recipe.relora.cycle == "projected"
        trainable = [full_rank] + [r * (o + (0 if projected else i)) for o, i in shapes]
        frozen_factors = sum(r * i for _, i in shapes) if projected else 0
    else:
        lm_head_trains, full_rank = True, embeddings + norms
        trainable = [full_rank] + [o * i for o, i in shapes]
        frozen_factors = 0
    accumulating = recipe.train.grad_accum_steps > 1
    out = {
        "frozen base (stored)": sum(base_bytes(o * i, o, lora.quant, lora.blocksize, lora.double_quant, w)
                                    for o, i in shapes) if relora else 0,
        "frozen full-rank weights": (embeddings + norms - full_rank) * w,
        "trainable weights": sum(trainable) * w,
        "gradients at peak": (sum(trainable) if accumulating else head * lm_head_trains) * w,
        "optimizer state": sum(adam_state_bytes(n, recipe.optim.name, w) for n in trainable),
    }
    per_layer = 2 * (4 * h + 2 * a * h) + a * (3 * h + 2 * kv) + 4 * a * f + len(shapes) // layers * a * r * relora
    chunk = recipe.train.loss_chunk_tokens
    if chunk:
        # The chunked loss holds one chunk's fp32 logits and a temporary of their size (log-sum-exp in forward, the
        # bf16 copy of their gradient in backward), plus fp32 log-sum-exp and int64 targets per token.
        loss_buffers = min(tokens, chunk) * vocab_size * (4 + 4) + tokens * (4 + 8)
    else:
        loss_buffers = tokens * vocab_size * (12 + (a if a != 4 else 0))
    if m.gradient_checkpointing:
        # The last block is recomputed after the loss buffers are freed: only what it needs beyond them counts,
        # its saved tensors plus the gradients its backward holds at once (about two of width f and two of h).
        recompute = tokens * (per_layer + 2 * a * (f + h))
        # Offloaded (train.offload_activations), the block inputs wait in host RAM; one is back while it is used.
        kept = 1 if recipe.train.offloads else layers
        out["activations"] = tokens * kept * w * h + max(0, recompute - loss_buffers)
    else:
        out["activations"] = tokens * layers * per_layer
        # Once the loss is small (chunked), the last block's backward, with the gradients of its MLP and attention
        # inputs (about f + 2h per token), is the larger moment.
        loss_buffers = max(loss_buffers, tokens * a * (f + 2 * h))
    out["logits and loss"] = loss_buffers
    out["dequantization transient"] = max(o * i for o, i in shapes) * a if relora and lora.quant != "none" else 0
    # Held during a gradient init's passes, which keep a step's activations but no weight gradients: counted on top
    # of the step's peak, an upper bound.
    if frozen_factors:  # a projected cycle's A: stored, neither a gradient nor moments
        out["frozen projections (A)"] = frozen_factors * w
    out["gradient-init sketches"] = sketch_bytes(shapes, r) if relora and recipe.relora.init == "gradient" else 0
    return out


class VocabUnknown(RecipeError):
    """The vocabulary size cannot be known without loading the tokenizer (train then skips its memory check)."""


def recipe_vocab_size(recipe: Recipe) -> int:
    """Embedding rows of the recipe's model: a pretrained model's config says; else model.vocab_size or the BPE's."""
    if recipe.model.pretrained:
        return pretrained_config(recipe.model.pretrained).vocab_size
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    if recipe.data.tokenizer in ("", "bpe"):
        return recipe.data.bpe_vocab_size
    raise VocabUnknown(f"model.vocab_size = 0: the size of tokenizer {recipe.data.tokenizer!r} is unknown before "
                      "loading it; set model.vocab_size (e.g. --set model.vocab_size=32000)")
