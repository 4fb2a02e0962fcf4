"""Gradient-informed restarts: each ReLoRA layer's new A spans the top-r right singular subspace of its weight
gradient, found by a randomized range finder that never forms the dense gradient (relora.init = "gradient").

For a layer y = x W^T (W: out x in) the weight gradient over a set of tokens is G = dL/dW = sum_t g_t^T x_t, with
g = dL/dy. Its right singular vectors live in R^in, the space A's rows (r x in) live in. Halko, Martinsson and Tropp's
two-pass randomized SVD (arXiv 0909.4061, algorithms 4.1 and 5.1) needs only products with G, and both are sums over
tokens that a backward pass hands us one micro-batch at a time:

    pass 1 (range):      Y = G^T Omega = sum_t x_t^T (g_t Omega)      Omega: out x k Gaussian, Y: in x k
                         Q = orth(Y)                                   in x k, spans the top of G's row space
    pass 2 (projection): Z = G Q = sum_t g_t^T (x_t Q)                 out x k
                         Z = U S V^T, so G ~ G Q Q^T = U S (Q V)^T, and Q V holds G's approximate right singular
                         vectors in order; A = the first r of them, as rows, scaled (see KAIMING_ROW_NORM), or
                         orthonormal as they are for relora.cycle = "projected" (A^T is then GaLore's P).

with k = r + OVERSAMPLING. Both passes run over the same micro-batches with the same random state, so they see the
same G. Per layer only the sketches are held: Y, then Q and Z, (in + out) x k fp32 numbers; Omega is regenerated
from a per-layer seed at each micro-batch instead of stored.

LoQT (arXiv 2405.16528) initialises its factors from a dense gradient and a full SVD per layer; the motivation is the
same: with B = 0 the first gradient of B is s G A^T, so an A spanning G's top right singular vectors makes the first
cycle's update follow the best rank-r part of the gradient instead of a random projection of it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lean_relora.model.relora import relora_layers
from lean_relora.recipe import RecipeError

OVERSAMPLING = 8  # extra sketch columns beyond the rank: Halko et al.'s p = 5..10 makes the range finder's error
                  # close to the best rank-r error with high probability
# Kaiming-uniform with a = sqrt(5) (ReLoRALinear.reset_lora) draws A from U(-1/sqrt(in), 1/sqrt(in)): variance
# 1 / (3 in), so a row's expected squared norm is 1/3 whatever `in` is. Gradient-initialised rows get that norm: the
# LoRA update's size and B's gradient (s g (A x)^T) stay those of a random restart, and so does what the learning
# rate and the re-warm mean; only the direction of A changes.
KAIMING_ROW_NORM = 1 / math.sqrt(3)


def sketch_bytes(shapes: list[tuple[int, int]], rank: int) -> int:
    """Device bytes the sketches hold at once (the projection pass: Q and Z of every layer), for (out, in) shapes."""
    return sum((o + i) * min(rank + OVERSAMPLING, i) * 4 for o, i in shapes)


class Sketch:
    """One layer's side of the range finder: accumulates Y (pass 1) or Z (pass 2) from (x, g) of each micro-batch."""

    def __init__(self, out_features: int, in_features: int, rank: int, seed: int, device: torch.device):
        self.out_features, self.in_features = out_features, in_features
        if rank > in_features:
            raise RecipeError(f"relora.init = 'gradient': lora.rank = {rank} exceeds a layer's {in_features} input "
                              "features, more directions than its gradient's row space has")
        self.k = min(rank + OVERSAMPLING, in_features)
        self.seed, self.device = seed, device
        self.q: torch.Tensor | None = None  # set after pass 1
        self.total = torch.zeros(self.in_features, self.k, device=self.device)  # Y in pass 1, then Z in pass 2

    def omega(self) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(self.seed)
        return torch.randn(self.out_features, self.k, generator=generator, device=self.device)

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        # The products run in the activations' dtype (bf16 under autocast) and accumulate in fp32: rounding each
        # micro-batch's sketch to bf16's 3 digits is far below the range finder's own error, and it spares the fp32
        # copies of x and g (a 1.3B layer: 4-7x faster on a CPU with AVX512-BF16; tensor cores on a GPU).
        dtype = torch.promote_types(x.dtype, g.dtype)
        x, g = x.reshape(-1, self.in_features).to(dtype), g.reshape(-1, self.out_features).to(dtype)
        if self.q is None:
            self.total += x.t() @ (g @ self.omega().to(dtype))
        else:
            self.total += g.t() @ (x @ self.q.to(dtype))

    def to_projection(self) -> None:
        self.q = torch.linalg.qr(self.total).Q
        self.total = torch.zeros(self.out_features, self.k, device=self.device)

    def right_vectors(self, rank: int) -> torch.Tensor:
        """The top `rank` approximate right singular vectors of G, as rows (rank x in), orthonormal."""
        # vh: k x k, ordered by singular value. Thin, as U (out x out when full) is never used, except when Z has
        # fewer rows than columns: then the full vh's last rows, Z's null space, complete A.
        _, _, vh = torch.linalg.svd(self.total, full_matrices=self.out_features < self.k)
        return vh[:rank] @ self.q.t()


class _SketchTap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands (input, output gradient) to the layer's sketch. The input is
    kept with save_for_backward, so gradient checkpointing recomputes it rather than this probe holding it."""

    @staticmethod
    def forward(ctx, y, x, sketch):
        ctx.save_for_backward(x)
        ctx.sketch = sketch
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.sketch.add(x, g)
        return g, None, None


def _sketch_hook(sketch: Sketch):
    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return output
        if not output.requires_grad:  # nothing before this layer trains in the init passes: its gradient is not needed
            output = output.detach().requires_grad_()
        return _SketchTap.apply(output, args[0].detach(), sketch)
    return hook


def _random_state(device: torch.device):
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _set_random_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def init_from_gradient(model: nn.Module, batches: list[torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor],
                       generator: torch.Generator) -> None:
    """Set every ReLoRA layer's A from the gradient of `loss_of(batch)` summed over `batches` (two forward/backward
    passes over each); B is left as it is (zero at a restart, so the function does not change). No parameter's
    .grad is touched: every parameter is frozen during the passes, which also skips the weight gradients."""
    layers = relora_layers(model)
    seeds = torch.randint(2**62, (len(layers),), generator=generator).tolist()
    sketches = [Sketch(layer.base.out_features, layer.base.in_features, layer.rank, seed, layer.lora_A.device)
                for layer, seed in zip(layers, seeds)]
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    device = layers[0].lora_A.device
    handles = [layer.register_forward_hook(_sketch_hook(s)) for layer, s in zip(layers, sketches)]
    start = _random_state(device)
    try:
        for p in params:
            p.requires_grad_(False)
        for projection in (False, True):
            _set_random_state(device, start)  # dropout draws the same masks in both passes: the same G
            for ids in batches:
                loss_of(ids).backward()
            if not projection:
                for sketch in sketches:
                    sketch.to_projection()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    with torch.no_grad():
        for layer, sketch in zip(layers, sketches):
            # A projected layer keeps the rows orthonormal: A^T is GaLore's P, whose scale is the layer's s.
            norm = 1.0 if layer.projected else KAIMING_ROW_NORM
            layer.lora_A.copy_(norm * sketch.right_vectors(layer.rank))
