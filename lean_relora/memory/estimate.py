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

import logging
import os
import re
from dataclasses import dataclass, replace

import torch

from lean_relora.memory.analytic import GIB, analytic, recipe_vocab_size, with_model_sizes
from lean_relora.memory.host_ram import HostRam, host_estimate, on_one_host
from lean_relora.memory.trace import Trace, trace
from lean_relora.recipe import Recipe, RecipeError
from lean_relora.training.peak import RELORA as RELORA_PHASE
from lean_relora.training.peak import WARM as WARM_PHASE

CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context and loaded kernels, typical for one process (outside torch's counters)
CUBLAS_HANDLES = 2  # threads that run matmuls: the training loop's and autograd's backward thread (one workspace each)
log = logging.getLogger(__name__)
ALLOCATOR_RESERVE = 0.10  # share of the peak the caching allocator holds beyond live tensors (fragmentation)


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


def visible_capability() -> tuple[int, int] | None:
    """The visible GPU's compute capability, or None; asked only where CUDA is already initialised (a launcher of
    several ranks must not open a CUDA context of its own just to size an estimate)."""
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_capability()
    return None


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
    return f"does not fit: needs {need:.1f} GiB, the GPU has {have:g} GiB; {advice(estimate)}"


def advice(estimate: Estimate) -> str:
    """What would make a recipe that does not fit fit."""
    fit = estimate.largest_micro_batch
    if fit:
        return f"set train.micro_batch_size = {fit} (raise grad_accum_steps to keep the batch)"
    return "not even micro-batch 1 fits: enable model.gradient_checkpointing, lower data.seq_len or lora.rank"


def refusal(recipe: Recipe, free_bytes: float, nproc: int = 1) -> str | None:
    """Why `train` should not start on a GPU with `free_bytes` free (each of `nproc`), or None when it fits."""
    result = estimate(recipe, free_bytes / GIB, baseline=False, nproc=nproc)
    if result.need <= free_bytes:
        return None
    return (f"the recipe needs about {result.need / GIB:.1f} GiB of GPU memory, {free_bytes / GIB:.1f} GiB are free "
            f"(lean-relora memory-estimate shows the breakdown); {advice(result)}, "
            "or pass --force to start anyway")


def phase_estimates(recipe: Recipe, vocab: int, device: torch.device, nproc: int = 1) -> dict[str, float]:
    """What training/peak.py measures, predicted for each phase of a run whose model has `vocab` embedding rows, bytes:
    GPU (PhaseEstimate.allocated) on CUDA, host-RAM peak elsewhere; empty when it cannot be made (logged, never
    fatal: the measurement is still worth recording). On CUDA this traces each phase on the CPU once (seconds; 15-30 s
    for a 7B), beside a run of hours."""
    try:
        # the model's own vocabulary (the tokenizer's, when model.vocab_size = 0); a pretrained one keeps its config
        sized = recipe if recipe.model.pretrained else replace(recipe, model=replace(recipe.model, vocab_size=vocab))
        if device.type == "cuda":
            phases = estimate(sized, baseline=False, nproc=nproc).phases
            return {WARM_PHASE if p.name != "ReLoRA" else RELORA_PHASE: float(p.allocated) for p in phases}
        host = host_estimate(with_model_sizes(sized), vocab, nproc)
        peak = float(host.process + host.masters + max(host.training, host.merge))  # setup is before the records
        return {WARM_PHASE: peak, RELORA_PHASE: peak}
    except (RecipeError, OSError, ValueError) as e:  # e.g. a pretrained config no longer reachable
        log.info("memory estimate skipped (%s): the measured peak is recorded without it", e)
        return {}
