"""Measuring restart fidelity: how much of a sequence of merged low-rank updates a stored base weight keeps.

Used by the tests (small tensors) and by bench/fidelity.py (the full study). Definitions, with deq(W) the weight the
forward pass computes with and D the sum of all merged updates:

    retention = <deq(W_n) - deq(W_0), D> / |D|^2              1.0 = every update is in the weights
    error ratio = |deq(W_n) - (W_0 + D)| / |deq(Q(W_0 + D)) - (W_0 + D)|
                                                             1.0 = as good as quantizing the exact sum once
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lean_relora.model.frozen_base import FrozenBase


@dataclass
class FidelityResult:
    quant: str
    keep_master: bool
    relative_delta: float  # |one update| / |W_0|
    restarts: int
    retention: float
    error_ratio: float
    probe_retention: float  # the running estimate a training run logs (RetentionProbe)
    seconds_per_merge: float


def simulate_restarts(quant: str, keep_master: bool, relative_delta: float, restarts: int = 20,
                      shape: tuple[int, int] = (1024, 1024), rank: int = 16, seed: int = 0,
                      device: str = "cpu") -> FidelityResult:
    """Merge `restarts` random rank-`rank` updates of size `relative_delta * |W_0|` into a W_0 ~ N(0, 0.02)."""
    import time

    generator = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=generator) * 0.02).to(device)
    base = FrozenBase(w0, None, quant, keep_master=keep_master, dtype=torch.float32)
    start = base.dequantize().clone()
    total = torch.zeros_like(w0)
    seconds = 0.0
    for _ in range(restarts):
        up = torch.randn(shape[0], rank, generator=generator).to(device)
        down = torch.randn(rank, shape[1], generator=generator).to(device)
        scale = float(relative_delta * w0.norm() / (up @ down).norm())
        total.addmm_(up, down, alpha=scale)
        began = time.perf_counter()
        base.add_low_rank_(up, down, scale)
        seconds += time.perf_counter() - began
    retention = float(((base.dequantize() - start) * total).sum() / total.pow(2).sum())
    exact = w0 + total
    once = FrozenBase(exact, None, quant, dtype=torch.float32).dequantize()
    error_ratio = float((base.dequantize() - exact).norm() / (once - exact).norm().clamp_min(1e-30))
    numerator, denominator = base.probe.terms()
    return FidelityResult(quant, keep_master, relative_delta, restarts, retention, error_ratio,
                          numerator / denominator, seconds / restarts)
