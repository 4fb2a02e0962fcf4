"""The state of a run that the loop, checkpoints and tools share: counters and the built objects.

It sits below loop.py and checkpoint.py so that both can name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lean_relora.data.prefetch import BatchLoader
from lean_relora.recipe import Recipe
from lean_relora.training.distributed import SOLO, Ranks
from lean_relora.training.schedule import JaggedCosine


@runtime_checkable
class BatchSource(Protocol):
    """Where a run's token blocks come from: data.packing.PackedData (documents, prepared files, a stream), or
    memory.measure.RandomTokens. A micro-batch is a function of its index, so a resumed run reads the same ones."""

    num_train_blocks: int | None  # None: a stream, whose length is unknown
    eos_token_id: int | None

    def train_batch(self, index: int, batch: int) -> torch.Tensor:
        """Micro-batch `index` of the training order: batch x seq_len token ids."""

    def eval_batches(self, batch: int, count: int) -> list[torch.Tensor]:
        """The fixed held-out micro-batches, the same at every evaluation."""

    def state_dict(self) -> dict:
        """A stream's position ({} where the index alone says it)."""

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Counters of a run; the data position is `micro_batches` (see PackedData.train_batch), and for a stream
    also `data` (StreamingPackedData.state_dict)."""

    step: int = 0  # optimizer steps done
    restarts: int = 0  # merges done
    tokens: int = 0  # tokens trained on
    micro_batches: int = 0  # micro-batches consumed, by all ranks together
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of every evaluation
    skipped: int = 0  # steps skipped for a NaN/inf loss or gradient (counted in `step`, no update made)
    bad_steps: int = 0  # of those, how many in a row up to now
    data: dict = field(default_factory=dict)  # a stream's position after the last micro-batch ({}: the index says all)


@dataclass
class Run:
    recipe: Recipe
    device: torch.device
    data: BatchSource
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    schedule: JaggedCosine
    generator: torch.Generator  # LoRA (re)initialisation and random optimizer reset
    state: TrainState
    run_dir: Path | None = None  # where the run writes (disk masters live in run_dir/master)
    loader: BatchLoader | None = None  # micro-batches made ahead of the step; None: one over `data` is built
    ranks: Ranks = SOLO  # the processes of the job (distributed.py); SOLO: this one alone
    ddp: nn.Module | None = None  # `model` under DistributedDataParallel, which the step runs; None for one process

    def __post_init__(self):
        if self.loader is None:
            self.loader = BatchLoader(self.data, self.recipe.train.micro_batch_size,
                                      pin_memory=self.device.type == "cuda", stride=self.ranks.size,
                                      offset=self.ranks.rank)
