"""The frozen base weight of a ReLoRA layer, stored through bitsandbytes. Nothing else in the package knows bnb's
quantization API.

Formats: nf4 / fp4 (bnb 4-bit blockwise, optional double quantization of the absmax statistics), int8 (bnb row-wise
absmax int8, the LLM.int8() weight format) and none (a plain frozen bf16/fp32 tensor).

We call bnb's functional API (`quantize_4bit`, `matmul_4bit`, `int8_vectorwise_quant`, `bnb.matmul`) rather than
wrap `Linear4bit`/`Linear8bitLt`: those modules keep state in parameter subclasses that a merge has to patch from the
outside (a `.data` assignment leaves `quant_state`/`CB`/`SCB` stale), repack 4-bit weights in place for CPU inference,
and cannot be built under FakeTensorMode. Here the whole stored form is replaced at once by `load_dense`.

Restart fidelity: a dense weight requantized after each small merge loses the update (it sits on the quantization grid,
and a delta smaller than half a step never moves it; see docs/fidelity.md). With `keep_master=True` the base keeps an
fp32 master copy off the accelerator (host RAM); merges add to the master and requantize from it, so every cycle's
update survives.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import nn

FOUR_BIT = ("nf4", "fp4")


class FrozenBase(nn.Module):
    """A frozen `y = x W^T + b` whose W is stored as `quant` (nf4 | fp4 | int8 | none)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: str, blocksize: int = 64,
                 double_quant: bool = True, keep_master: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.quant, self.blocksize, self.double_quant, self.dtype = quant, blocksize, double_quant, dtype
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.device, dtype, copy=True))
        self.quant_state: bnbf.QuantState | None = None
        # The master stays in host memory whatever device the module moves to: it is not a buffer.
        self.master = weight.detach().to("cpu", torch.float32, copy=True) if keep_master else None
        if self.master is not None and torch.cuda.is_available():
            self.master = self.master.pin_memory()
        self.load_dense(weight)

    @torch.no_grad()
    def load_dense(self, dense: torch.Tensor) -> None:
        """Replace the stored weight (codes and every statistic together) by a quantization of `dense`."""
        if self.quant in FOUR_BIT:
            packed, state = bnbf.quantize_4bit(dense.contiguous(), blocksize=self.blocksize, quant_type=self.quant,
                                               compress_statistics=self.double_quant, quant_storage=torch.uint8)
            self._set_buffer("packed", packed)
            self.quant_state = state
        elif self.quant == "int8":
            codes, row_absmax, _ = bnbf.int8_vectorwise_quant(dense.to(torch.float16).contiguous())
            self._set_buffer("codes", codes)
            self._set_buffer("row_absmax", row_absmax)
        elif self.quant == "none":
            self._set_buffer("weight", dense.to(self.dtype, copy=True))
        else:
            raise ValueError(f"unknown quant type {self.quant!r}")

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The weight the forward pass computes with, as a dense fp32 tensor on the module's device."""
        if self.quant in FOUR_BIT:
            return bnbf.dequantize_4bit(self.packed, self.quant_state).float()
        if self.quant == "int8":
            return bnbf.int8_vectorwise_dequant(self.codes, self.row_absmax).float()
        return self.weight.float()

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> None:
        """W += delta, then requantize. Extra device memory: about one dense fp32 copy of this layer's weight."""
        if self.master is not None:
            self.master += delta.to(self.master.device, torch.float32)
            del delta
            self.load_dense(self.master.to(self.device, non_blocking=True))
        else:
            self.load_dense(self.dequantize().add_(delta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant in FOUR_BIT:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return bnb.matmul_4bit(x, self.packed, quant_state=self.quant_state, bias=bias)
        if self.quant == "int8":
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.has_fp16_weights, state.is_training = self.codes, self.row_absmax, False, self.training
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return bnb.matmul(x, self.codes, state=state, bias=bias).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def stored_bytes(self) -> int:
        """Device bytes of the stored weight and its statistics (bias excluded)."""
        tensors = [b for name, b in self.named_buffers() if name != "bias"]
        if self.quant_state is not None:
            tensors += _quant_state_tensors(self.quant_state)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        if name in self._buffers:
            self._buffers[name] = value
        else:
            self.register_buffer(name, value)

    def _apply(self, fn, recurse=True):
        # The 4-bit quant state is a plain object holding tensors; move it with the packed codes.
        super()._apply(fn, recurse)
        if self.quant_state is not None:
            self.quant_state.to(self.packed.device)
        return self

    def extra_repr(self) -> str:
        master = ", fp32 master in host RAM" if self.master is not None else ""
        return f"{self.in_features} -> {self.out_features}, quant={self.quant}{master}"


def _quant_state_tensors(state: bnbf.QuantState) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]
