"""Measured, not predicted: the peak device memory, step time and merge time of a recipe's model on a real device.

The model is trained through the loop's own functions (train.start_relora, train_step, restart) on random tokens, so
what is measured is what `train` runs; memory-estimate's prediction is checked against it (bench/gpu_acceptance.py,
tests/test_cuda.py). On CUDA the peak is torch's max_memory_allocated/reserved; bitsandbytes' paged optimizer state
lives outside torch's counters and is reported beside it. On a CPU the peak is the live tensor bytes of the same step
(trace.LiveBytes on real tensors), which is how the measurement itself is tested without a GPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from lean_relora.memory.trace import LiveBytes, model_tensors
from lean_relora.model.build import build_model
from lean_relora.recipe import Recipe
from lean_relora.training.loop import start_relora, start_warm
from lean_relora.training.optim import paged_bytes_held
from lean_relora.training.restart import restart
from lean_relora.training.run import Run, TrainState
from lean_relora.training.schedule import JaggedCosine
from lean_relora.training.step import train_step


class RandomTokens:
    """A BatchSource of uniform random blocks, the same for the same micro-batch index (the place of PackedData)."""

    num_train_blocks = None
    eos_token_id = None

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def train_batch(self, index: int, batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randint(0, self.vocab_size, (batch, self.seq_len), generator=generator)

    def eval_batches(self, batch: int, count: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed((self.seed + 1) * 7_919_000_003)  # blocks training never draws
        return [torch.randint(0, self.vocab_size, (batch, self.seq_len), generator=generator) for _ in range(count)]

    def state_dict(self) -> dict:
        return {}  # the index is the whole position

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Measured:
    peak_allocated: int
    """Bytes: torch's peak allocated during one steady-state step, cuBLAS workspaces included (CPU: live tensors)."""
    peak_reserved: int | None
    """Bytes: the caching allocator's peak reservation (CUDA only)."""
    paged_bytes: int
    """Bytes of this run's bnb paged optimizer state (cudaMallocManaged: outside torch's counters)."""
    paged_held: int
    """Bytes of paged state the whole process holds: bnb frees none, so earlier optimizers' state stays too."""
    workspace_bytes: int | None
    """Bytes of cuBLAS workspaces torch held after the step (freed to count them; CUDA only, else None)."""
    step_seconds: float
    """Median wall time of an optimizer step, seconds."""
    merge_seconds: float
    """Wall time of one restart (merge every layer, re-init, reset the optimizer state), seconds."""
    tokens_per_step: int

    @property
    def peak(self) -> int:
        """What memory-estimate predicts as the phase's allocated peak (PhaseEstimate.allocated): torch's peak plus
        the paged state it counts as GPU memory."""
        return self.peak_allocated + self.paged_bytes


def relora_run(recipe: Recipe, vocab_size: int, device: torch.device, warm_start: bool = False) -> Run:
    """The ReLoRA phase of `recipe` on `device`, built as train.setup and start_relora build it, on random tokens;
    with `warm_start`, after one step of the full-rank warm start, as a run with relora.warm_start_steps gets it."""
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, vocab_size, recipe.data.seq_len)
    schedule = JaggedCosine.of(recipe)
    run = Run(recipe, device, RandomTokens(vocab_size, recipe.data.seq_len, recipe.train.seed), model, None,
              schedule, torch.Generator().manual_seed(recipe.train.seed), TrainState())
    if warm_start:
        start_warm(run)
        train_step(run)
    start_relora(run)
    return run


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in optimizer_tensors(optimizer) if getattr(t, "is_paged", False))


def cublas_workspaces_held(device: torch.device) -> int | None:
    """Bytes of the cuBLAS workspaces torch holds now, measured by freeing them (torch allocates them again at the
    next matmul); None where this torch has no way to free them."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    clear()
    return before - torch.cuda.memory_allocated(device)


def measure(recipe: Recipe, vocab_size: int, device: torch.device | str, timed_steps: int = 3) -> Measured:
    """Build the ReLoRA phase, take a step (the optimizer state appears), restart once (timed), take a step, then
    measure the peak of one steady-state step and time `timed_steps` more."""
    device = torch.device(device)
    run = relora_run(recipe, vocab_size, device)
    train_step(run)
    merge_seconds = restart(run)["merge_seconds"]
    train_step(run)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(run)
        torch.cuda.synchronize(device)
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        workspaces = cublas_workspaces_held(device)
    else:
        with LiveBytes(*model_tensors(run.model), *optimizer_tensors(run.optimizer)) as tracker:
            train_step(run)
        allocated, reserved, workspaces = tracker.peak, None, None
    times = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        train_step(run)  # .item() of the loss inside waits for the device
        times.append(time.perf_counter() - start)
    tokens = recipe.train.micro_batch_size * recipe.train.grad_accum_steps * recipe.data.seq_len
    return Measured(allocated, reserved, paged_bytes(run.optimizer), paged_bytes_held(), workspaces,
                    statistics.median(times), merge_seconds, tokens)
