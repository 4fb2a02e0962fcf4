"""Activations kept in host RAM between a micro-batch's forward and its backward (train.offload_activations).

With gradient checkpointing a step keeps, per decoder block, only the block's input until backward recomputes the
block (tokens x hidden x 2 bytes each: 0.37 GiB for the 1.3B recipe's micro-batch, all of it live when backward
starts and most of it while the last blocks are recomputed). torch's non-reentrant checkpoint saves those inputs
through the autograd's saved-tensor hooks of the code around it, so a hook installed around the model's forward
sees exactly them (the blocks' own tensors get the checkpoint's hooks, which are innermost) plus the few tensors
saved outside the blocks (the final norm's, the loss's hidden states). Each is copied to pinned host memory as it
is saved and copied back when backward asks for it; the device copy is freed at once.

Parameters are never moved (they stay on the device anyway), nor tensors under MIN_BYTES (positions, token ids).
The copies are asynchronous: on one CUDA stream the copy back is ordered after the copy out, and the caching
allocator reuses a freed block only for work queued after it, so no synchronisation is needed. What this costs
is PCIe time, twice the offloaded bytes per micro-batch, and as much pinned host RAM.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: moving them would cost more than it frees
HOST = torch.device("cpu")


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep every saved activation of `min_bytes` or more on `host` until backward needs it.
    `offloaded` counts the bytes moved out since the hooks were made."""

    def __init__(self, host: torch.device = HOST, min_bytes: int = MIN_BYTES):
        self.host, self.min_bytes, self.offloaded = host, min_bytes, 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if isinstance(tensor, nn.Parameter) or tensor.untyped_storage().nbytes() < self.min_bytes:
            return tensor
        pinned = self.host.type == "cpu" and tensor.device.type == "cuda"  # GPU -> host: asynchronous
        copy = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, device=self.host,
                           pin_memory=pinned)
        copy.copy_(tensor, non_blocking=pinned)
        self.offloaded += copy.untyped_storage().nbytes()
        return tensor.device, copy

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, copy = packed
        return copy.to(device, non_blocking=copy.is_pinned())


def offloading(enabled: bool, host: torch.device = HOST):
    """The context a micro-batch's forward runs in: OffloadSaved when `enabled`, else nothing."""
    return OffloadSaved(host) if enabled else nullcontext()
