"""Data parallelism over the processes `torchrun` starts, with the fp32 masters sharded across them.

Every rank quantizes the same base and trains the same trainable parameters (LoRA factors, full-rank embeddings,
norms, head) under torch's DistributedDataParallel, on different micro-batches of one deterministic order: rank r of
N takes micro-batches i + r of the global count i, i + N, ... So one optimizer step sees N x micro_batch_size x
grad_accum_steps sequences, and with N ranks of micro-batch m it sees the sequences one process of micro-batch N x m
would.

A layer's fp32 master lives on one rank only, its owner (`owners`: greedy by bytes, the same on every rank). At a
restart (training/restart.py, the one routine for one process and several) each owner merges its layers, then every
layer's stored form (codes and the quant state: 4-bit absmax, nested statistics, int8 row absmax) is broadcast from
its owner (`broadcast_bases`), so the bases stay bit-identical and the merge work and the masters' host RAM are
divided by N. This module decides owners and moves tensors; it merges nothing itself.

A single process (WORLD_SIZE unset or 1) gets SOLO: no process group, no wrapper, every collective the identity.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lean_relora.model.relora import ReLoRALinear
from lean_relora.recipe import Recipe

BACKEND = "cpu:gloo,cuda:nccl"  # CPU tensors (flags, Python objects) over gloo, CUDA tensors over NCCL
TIMEOUT = timedelta(minutes=30)  # a rank waiting this long on the others gives up (a merge of 7B takes minutes)


class Ranks:
    """The processes of one job, as this process sees them. The methods are collectives: every rank calls them in
    the same order."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def is_main(self) -> bool:
        """Rank 0: it logs, writes metrics and the replicated part of each checkpoint."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank of a host: cuda:LOCAL_RANK."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.several else device

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def broadcast(self, obj, src: int = 0):
        """Rank `src`'s (picklable) object, on every rank."""
        if not self.several:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        if not self.several:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, signal: str | None) -> str | None:
        """A stop request (a signal's name) that any rank received, on every rank, so that all stop after the same
        step: one small all-reduce per step, and a gather only when some rank has one."""
        if not self.several:
            return signal
        flag = torch.tensor([int(signal is not None)])
        dist.all_reduce(flag, dist.ReduceOp.MAX)
        return next(s for s in self.gather(signal) if s is not None) if flag.item() else None

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over the ranks (float64, so a mean of losses is as exact as one process's)."""
        if not self.several:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the ranks, in its own dtype (as one process would accumulate it)."""
        if self.several:
            dist.all_reduce(tensor)
        return tensor

    def wrap(self, model: nn.Module, loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> nn.Module | None:
        """`loss(model, ids)` as the forward of a module under DistributedDataParallel, over the parameters that
        train now; None for one process. The whole loss is DDP's forward because the chunked loss (model/loss.py) runs
        the model's trunk and its output layer separately. Built again whenever the set of trainable parameters
        changes (ReLoRA begins after a warm start)."""
        if not self.several:
            return None
        device = next(model.parameters()).device
        return DistributedDataParallel(LossOf(model, loss), device_ids=[device] if device.type == "cuda" else None,
                                       **no_buffer_sync(DistributedDataParallel))

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block alone (it writes caches in the run directory: tokenizer, tokenized data), then
        the others run it and find them."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # ------------------------------------------------------------------------------------------- masters

    def owners(self, numels: list[int]) -> list[int]:
        """The rank that keeps each layer's master: largest layer first to the rank holding the fewest bytes so far
        (ties: the lower rank), a pure function of the sizes, so every rank computes the same list."""
        load, owner = [0] * self.size, [0] * len(numels)
        for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[index], load[rank] = rank, load[rank] + numels[index]
        return owner

    def owned(self, named: list[tuple[str, nn.Module]]) -> set[str] | None:
        """Names of the target layers (name, nn.Linear or Conv1D) whose master this rank keeps; None: all of them."""
        if not self.several:
            return None
        owners = self.owners([module.weight.numel() for _, module in named])
        return {name for (name, _), rank in zip(named, owners) if rank == self.rank}

    @torch.no_grad()
    def broadcast_bases(self, layers: list[ReLoRALinear], owners: list[int]) -> None:
        """Every layer's stored base (codes and quant state) from the rank that merged it to all others."""
        if not self.several:
            return
        for layer, owner in zip(layers, owners):
            for tensor in layer.base.stored_tensors():
                dist.broadcast(tensor, owner)

    def check_identical(self, layers: list[ReLoRALinear]) -> str:
        """The sha256 of every stored base, the same on every rank; RuntimeError naming the first layer that
        differs (a bug: the broadcast after a merge must make them equal)."""
        digests = [base_sha256(layer) for layer in layers]
        for rank, theirs in enumerate(self.gather(digests)):
            for index, (mine, other) in enumerate(zip(digests, theirs)):
                if mine != other:
                    raise RuntimeError(f"ReLoRA layer {index}: rank {rank}'s stored base differs from rank "
                                       f"{self.rank}'s after a merge")
        return hashlib.sha256("".join(digests).encode()).hexdigest()


SOLO = Ranks()


def no_buffer_sync(ddp: type) -> dict[str, bool]:
    """DDP's argument that stops it re-sending buffers at every forward: the buffers are the frozen bases, identical
    by construction and after every merge. torch 2.13 names it forward_sync_buffers and deprecates broadcast_buffers;
    earlier releases (2.11 on our GPU machine) know only broadcast_buffers."""
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class LossOf(nn.Module):
    """A module whose forward is `loss(model, *inputs)`: what DDP wraps."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *inputs) -> torch.Tensor:
        return self.loss(self.model, *inputs)


def resume_refusal(saved: int, ranks: int, recipe: Recipe) -> str | None:
    """Why a checkpoint that `saved` ranks wrote should not be continued by `ranks` (the global batch would change),
    or None. The state itself fits any count: the masters are one file per layer, whoever owns it now."""
    if saved == ranks:
        return None
    batch = recipe.train.micro_batch_size * recipe.train.grad_accum_steps
    return (f"trained by {saved} process(es), resumed by {ranks}; that changes the global batch from {saved * batch} "
            f"to {ranks * batch} sequences: resume with --nproc {saved} (torchrun --nproc-per-node {saved}) or pass "
            "--force")


def base_sha256(layer: ReLoRALinear) -> str:
    digest = hashlib.sha256()
    for tensor in layer.base.stored_tensors():
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join() -> Ranks:
    """This process's place in the job: from torchrun's RANK, WORLD_SIZE and LOCAL_RANK, joining the process group
    on first call; SOLO when there is one process."""
    if not launched():
        return SOLO
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if local_rank < torch.cuda.device_count():  # (a CPU run on a GPU host may have more ranks than GPUs)
            torch.cuda.set_device(local_rank)  # NCCL's collectives use the current device
        dist.init_process_group(BACKEND if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return Ranks(rank, size, local_rank)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
