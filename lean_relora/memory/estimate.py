"""Peak GPU memory of a recipe, predicted before training, by two methods that check each other.

traced: the very model and optimizer that training builds, one steady-state step run on fake tensors with its live
    tensor bytes counted (trace.py). A 1.3B or 7B model traces on a CPU in seconds.
analytic: the same quantities from formulas (below), broken down by component.

Neither sees what a step holds beyond its tensors. cuBLAS workspaces are allocated through torch's caching allocator
(inside max_memory_allocated) and are added to the traced peak by their known size; the CUDA context and the
allocator's fragmentation lie outside torch's counters and are added as a stated margin. bnb's paged optimizer state
(cudaMallocManaged) is also invisible to torch on a GPU; here it is counted as GPU memory (it can spill to host RAM
under pressure, slowly).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

import torch
from transformers.pytorch_utils import Conv1D

from lean_relora.training.distributed import Ranks
from lean_relora.model.gradinit import sketch_bytes
from lean_relora.memory.host_ram import HostRam, host_ram, on_one_host
from lean_relora.model.build import architecture, build_model, pretrained_config, sizes
from lean_relora.recipe import Recipe, RecipeError
from lean_relora.model.relora import target_modules
from lean_relora.memory.trace import Trace, trace, uses_autocast

GIB = 2**30
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context and loaded kernels, typical for one process (outside torch's counters)
CUBLAS_HANDLES = 2  # threads that run matmuls: the training loop's and autograd's backward thread (one workspace each)
ALLOCATOR_RESERVE = 0.10  # share of the peak the caching allocator holds beyond live tensors (fragmentation)
BNB_OPTIM_BLOCK = 256  # elements per absmax of bnb's 8-bit optimizer state
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit optimizer state in bnb


# ---- analytic model -------------------------------------------------------------------------------------------

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
        trainable = [full_rank] + [r * (o + i) for o, i in shapes]
    else:
        lm_head_trains, full_rank = True, embeddings + norms
        trainable = [full_rank] + [o * i for o, i in shapes]
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
    out["gradient-init sketches"] = sketch_bytes(shapes, r) if relora and recipe.relora.init == "gradient" else 0
    return out


# ---- the estimate a user sees ---------------------------------------------------------------------------------

def cublas_workspace_bytes(capability: tuple[int, int] | None = None) -> int:
    """Bytes of the cuBLAS workspaces a training process keeps: torch allocates one per (cuBLAS handle, stream)
    through its caching allocator and never frees it, and a handle belongs to a thread. torch's size per workspace:
    CUBLAS_WORKSPACE_CONFIG (":KiB:count" pairs) if set, else 32 MiB on sm90 (Hopper) and 8 MiB + 128 KiB elsewhere
    (aten/src/ATen/cuda/CublasHandlePool.cpp; cuBLASLt shares it). `capability`: the GPU's (major, minor); None (no GPU
    visible: the estimate is for a card elsewhere) takes the larger size."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":(\d+):(\d+)", config or "")
    if pairs:
        each = sum(int(kib) * 1024 * int(count) for kib, count in pairs)
    elif capability is None or capability == (9, 0):
        each = 4096 * 1024 * 8
    else:
        each = 4096 * 1024 * 2 + 16 * 1024 * 8
    return CUBLAS_HANDLES * each


def gpu_need(peak: float) -> float:
    """Bytes a GPU must have free for a peak of live tensor bytes (cuBLAS workspaces included): allocator reserve and
    CUDA context added."""
    return peak * (1 + ALLOCATOR_RESERVE) + CUDA_CONTEXT_BYTES


@dataclass
class PhaseEstimate:
    name: str
    components: dict[str, int]  # analytic, bytes
    traced: Trace
    ddp_buckets: int = 0  # with several ranks: DistributedDataParallel's copy of the gradients it averages, bytes
    workspaces: int = 0  # cuBLAS workspaces, bytes: inside torch's allocated counter, outside the trace

    @property
    def analytic_peak(self) -> int:
        return sum(self.components.values()) + self.ddp_buckets

    @property
    def allocated(self) -> int:
        """What torch's max_memory_allocated should read at this phase's peak (paged optimizer state added)."""
        return self.traced.peak + self.ddp_buckets + self.workspaces

    @property
    def need(self) -> float:
        return gpu_need(self.allocated)


@dataclass
class Estimate:
    phases: list[PhaseEstimate]  # those the recipe runs, then the full-rank bf16 AdamW baseline
    host: HostRam  # bytes of host RAM by phase, of one rank
    gpu_bytes: float
    largest_micro_batch: int  # ReLoRA phase, 0 = not even 1 fits
    nproc: int = 1  # ranks (one per GPU); GPU figures are per GPU
    host_per_host: int = 0  # bytes of host RAM at the peak of all nproc ranks on one host

    @property
    def need(self) -> float:
        return max(p.need for p in self.phases if not p.name.startswith("baseline"))


class VocabUnknown(RecipeError):
    """The vocabulary size cannot be known without loading the tokenizer (train then skips its memory check)."""


def visible_capability() -> tuple[int, int] | None:
    """The visible GPU's compute capability, or None; asked only where CUDA is already initialised (a launcher of
    several ranks must not open a CUDA context of its own just to size an estimate)."""
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_capability()
    return None


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


def estimate(recipe: Recipe, gpu_gb: float = 24.0, baseline: bool = True, nproc: int = 1) -> Estimate:
    """Every phase the recipe runs, and (with `baseline`) a full-rank bf16 AdamW run of the same model, per GPU of
    `nproc` ranks. A pretrained model is estimated from its config alone: no weight is read."""
    recipe = with_model_sizes(recipe)
    vocab = recipe_vocab_size(recipe)

    workspaces = cublas_workspace_bytes(visible_capability())

    def phase(name: str, kind: str, of: Recipe = recipe) -> PhaseEstimate:
        components = analytic(of, vocab, kind)
        return PhaseEstimate(name, components, trace(of, vocab, kind),
                             components["trainable weights"] if nproc > 1 else 0, workspaces)

    phases = [phase("ReLoRA", "relora")]
    if recipe.relora.warm_start_steps:
        phases.append(phase("full-rank warm start", "full"))
    if baseline:
        dense = replace(recipe, optim=replace(recipe.optim, name="adamw"), model=replace(recipe.model, dtype="bf16"))
        phases.append(phase("baseline: full-rank bf16 AdamW", "full", dense))
    host = host_estimate(recipe, vocab, nproc)
    run_phases = [(p, "relora" if p.name == "ReLoRA" else "full") for p in phases if not p.name.startswith("base")]
    # what the trace does not hold, scaled by the reserve as gpu_need scales it
    fit = min(largest_micro_batch(recipe, vocab, p, kind,
                                  gpu_gb * GIB - (p.allocated - p.traced.peak) * (1 + ALLOCATOR_RESERVE))
              for p, kind in run_phases)
    return Estimate(phases, host, gpu_gb * GIB, fit, nproc, on_one_host(host, nproc))


RESIDENT = ("frozen base (stored)", "frozen full-rank weights", "trainable weights", "optimizer state")


def host_estimate(recipe: Recipe, vocab: int, nproc: int = 1) -> HostRam:
    """Host RAM by phase (host.py) of one of `nproc` ranks, from the analytic model alone: quick enough for train's
    pre-start check. A rank keeps the masters distributed.py assigns it: the largest share counts."""
    shapes, m = target_shapes(recipe, vocab), recipe.model
    others = (2 * m.num_layers + 1 + vocab * (1 if m.tie_embeddings else 2)) * m.hidden_size
    relora = analytic(recipe, vocab)
    step = max(sum(relora.values()), sum(analytic(recipe, vocab, "full").values()) if
               recipe.relora.warm_start_steps else 0)
    embedding = vocab * m.hidden_size
    largest = max(max(o * i for o, i in shapes) if recipe.relora.warm_start_steps else 0,
                  embedding if recipe.lora.train_embeddings or recipe.lora.train_lm_head else 0,
                  max(recipe.lora.rank * max(o, i) for o, i in shapes))
    offloaded = offloaded_bytes(recipe) if recipe.train.offloads else 0
    host = host_ram(recipe, [o * i for o, i in shapes], others, step, sum(relora[k] for k in RESIDENT), largest,
                    relora["trainable weights"], offloaded)
    if nproc > 1 and host.masters:
        owners = Ranks(0, nproc).owners([o * i for o, i in shapes])
        share = max(sum(4 * o * i for (o, i), rank in zip(shapes, owners) if rank == r) for r in range(nproc))
        host = replace(host, masters=share, masters_total=host.masters)
    return host


def offloaded_bytes(recipe: Recipe) -> int:
    """Host bytes train.offload_activations holds at the start of backward: every block's input and the final
    hidden states the loss keeps, in the model's dtype, and what the final RMSNorm saves (two fp32 tensors and one
    in the model's dtype; tests/test_offload.py counts them)."""
    m = recipe.model
    w = 2 if m.dtype == "bf16" else 4
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    return tokens * m.hidden_size * (w * (m.num_layers + 2) + 8)


def host_refusal(recipe: Recipe, available: int, nproc: int = 1) -> str | None:
    """Why `train` should not start with `available` bytes of host RAM (shared by `nproc` ranks), or None when the
    recipe fits."""
    recipe = with_model_sizes(recipe)
    host = host_estimate(recipe, recipe_vocab_size(recipe), nproc)
    need = on_one_host(host, nproc)
    if need <= available:
        return None
    advice = 'set relora.master = "disk", ' if host.masters_total else ""
    return (f"the recipe needs about {need / GIB:.1f} GiB of host RAM at its peak, {available / GIB:.1f} GiB "
            f"are available (lean-relora memory-estimate shows the breakdown); {advice}free memory, or pass --force "
            "to start anyway")


def largest_micro_batch(recipe: Recipe, vocab: int, estimate: PhaseEstimate, phase: str, gpu_bytes: float) -> int:
    """Peak memory is affine in the micro-batch: the analytic model gives the part that does not grow with it, the
    trace at the recipe's micro-batch fixes the growth per sequence."""
    one, two = (sum(analytic(recipe, vocab, phase, micro_batch_size=b).values()) for b in (1, 2))
    fixed = 2 * one - two
    per_sequence = (estimate.traced.peak - fixed) / estimate.traced.micro_batch_size
    budget = (gpu_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_RESERVE)
    return max(0, int((budget - fixed) // per_sequence))


def render(estimate: Estimate, recipe: Recipe):
    """Rich tables: GPU memory by component and phase, host memory, and the verdict line."""
    from rich.table import Table

    gib = lambda n: f"{n / GIB:,.2f}"  # noqa: E731
    ranks = f", each of {estimate.nproc} GPUs (ranks)" if estimate.nproc > 1 else ""
    table = Table(title=f"Peak GPU memory (GiB), micro-batch {recipe.train.micro_batch_size} x "
                        f"{recipe.data.seq_len} tokens{ranks}", title_justify="left")
    table.add_column("component")
    for phase in estimate.phases:
        table.add_column(phase.name, justify="right")
    for key in estimate.phases[0].components:
        table.add_row(key, *(gib(p.components.get(key, 0)) for p in estimate.phases))
    if estimate.nproc > 1:
        table.add_row("DDP gradient buckets", *(gib(p.ddp_buckets) for p in estimate.phases))
    table.add_section()
    table.add_row("analytic peak", *(gib(p.analytic_peak) for p in estimate.phases))
    table.add_row("traced peak (fake-tensor step)", *(gib(p.traced.peak) for p in estimate.phases))
    table.add_row(f"cuBLAS workspaces ({CUBLAS_HANDLES} threads)", *(gib(p.workspaces) for p in estimate.phases))
    table.add_row(f"allocator reserve ({ALLOCATOR_RESERVE:.0%} of allocated)",
                  *(gib(ALLOCATOR_RESERVE * p.allocated) for p in estimate.phases))
    table.add_row("CUDA context (typical)", *(gib(CUDA_CONTEXT_BYTES) for _ in estimate.phases))
    table.add_row("[bold]GPU need", *(f"[bold]{gib(p.need)}" for p in estimate.phases))
    where = "the CPU it trains on" if recipe.train.device == "cpu" else "beside the GPU"
    per_rank = f", one of {estimate.nproc} ranks: its share of the masters" if estimate.nproc > 1 else ""
    host = Table(title=f"Host RAM, {where} (GiB; masters: {recipe.relora.master}{per_rank})", title_justify="left")
    host.add_column("what")
    host.add_column("GiB", justify="right")
    for key, value in estimate.host.rows().items():
        host.add_row(f"[bold]{key}" if key == "peak" else key, gib(value))
    if estimate.nproc > 1:
        host.add_row(f"[bold]peak of the host ({estimate.nproc} ranks on it)", gib(estimate.host_per_host))
    return table, host, verdict(estimate, recipe)


def verdict(estimate: Estimate, recipe: Recipe) -> str:
    need, have = estimate.need / GIB, estimate.gpu_bytes / GIB
    fit = estimate.largest_micro_batch
    if need <= have:
        return (f"fits: needs {need:.1f} GiB of {have:g} GiB; the largest micro-batch that fits is {fit} "
                f"(train.micro_batch_size = {recipe.train.micro_batch_size})")
    advice = f"set train.micro_batch_size = {fit} (raise grad_accum_steps to keep the batch)" if fit else (
        "not even micro-batch 1 fits: enable model.gradient_checkpointing, lower data.seq_len or lora.rank")
    return f"does not fit: needs {need:.1f} GiB, the GPU has {have:g} GiB; {advice}"


def refusal(recipe: Recipe, free_bytes: float, nproc: int = 1) -> str | None:
    """Why `train` should not start on a GPU with `free_bytes` free (each of `nproc`), or None when it fits."""
    result = estimate(recipe, free_bytes / GIB, baseline=False, nproc=nproc)
    if result.need <= free_bytes:
        return None
    return (f"the recipe needs about {result.need / GIB:.1f} GiB of GPU memory, {free_bytes / GIB:.1f} GiB are free "
            f"(lean-relora memory-estimate shows the breakdown); {verdict(result, recipe).split('; ', 1)[1]}, "
            "or pass --force to start anyway")
