"""The frozen base weight of a ReLoRA layer, stored through bitsandbytes. Nothing else in the package knows bnb's
quantization API.

Formats: nf4 / fp4 (bnb 4-bit blockwise, optional double quantization of the absmax statistics), int8 (bnb row-wise
absmax int8, the LLM.int8() weight format) and none (a plain frozen bf16/fp32 tensor).

We call bnb's functional API (`quantize_4bit`, `matmul_4bit`, `int8_vectorwise_quant`) rather than
wrap `Linear4bit`/`Linear8bitLt`: those modules keep state in parameter subclasses that a merge has to patch from the
outside (a `.data` assignment leaves `quant_state`/`CB`/`SCB` stale), repack 4-bit weights in place for CPU inference,
and cannot be built under FakeTensorMode. Here the whole stored form is replaced at once by `load_dense`.

Restart fidelity: a dense weight requantized after each small merge loses the update (it sits on the quantization grid,
and a delta smaller than half a step never moves it; see docs/fidelity.md). With `keep_master=True` the base keeps an
fp32 master copy off the accelerator (host RAM); merges add to the master and requantize from it, so every cycle's
update survives.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import nn

from lean_relora.model.master import DiskMaster, RamMaster

FOUR_BIT = ("nf4", "fp4")
INT8_ROWS_PER_SLICE = 256  # rows converted to fp16 at once when quantizing to int8


class FrozenBase(nn.Module):
    """A frozen `y = x W^T + b` whose W is stored as `quant` (nf4 | fp4 | int8 | none)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: str, blocksize: int = 64,
                 double_quant: bool = True, keep_master: bool = False, dtype: torch.dtype = torch.bfloat16,
                 master: RamMaster | DiskMaster | None = None):
        super().__init__()
        self.quant, self.blocksize, self.double_quant, self.dtype = quant, blocksize, double_quant, dtype
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.device, dtype, copy=True))
        self.quant_state: bnbf.QuantState | None = None
        # The master stays off the accelerator whatever device the module moves to (master.py: host RAM or disk).
        self.master = master if master is not None else RamMaster(weight) if keep_master else None
        self.load_dense(weight)
        self.probe = RetentionProbe(self.dequantize())

    @torch.no_grad()
    def load_dense(self, dense: torch.Tensor) -> None:
        """Replace the stored weight (codes and every statistic together) by a quantization of `dense`."""
        if self.quant in FOUR_BIT:
            packed, state = bnbf.quantize_4bit(dense.contiguous(), blocksize=self.blocksize, quant_type=self.quant,
                                               compress_statistics=self.double_quant, quant_storage=torch.uint8)
            # bnb records the quantized tensor's dtype and dequantizes to it in backward; from the fp32 master that
            # would build a dense fp32 weight in every backward: compute in the model's dtype instead.
            state.dtype = self.dtype
            self._set_buffer("packed", packed)
            self.quant_state = state
        elif self.quant == "int8":
            # bnb's CUDA kernel takes fp16; the quantization is per row, so convert a slice of rows at a time
            # rather than the whole layer (that would add half a dense fp32 copy to the merge transient).
            codes = torch.empty(dense.shape, dtype=torch.int8, device=dense.device)
            row_absmax = torch.empty(dense.shape[0], dtype=torch.float32, device=dense.device)
            for start in range(0, dense.shape[0], INT8_ROWS_PER_SLICE):
                rows = slice(start, start + INT8_ROWS_PER_SLICE)
                codes[rows], row_absmax[rows], _ = bnbf.int8_vectorwise_quant(dense[rows].to(torch.float16))
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
    def add_low_rank_(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        """W += scale * up @ down, then requantize. Extra device memory: one dense fp32 copy of W, in which the
        product is accumulated in place (addmm_), so no separate delta is ever materialised."""
        self.probe.add_low_rank(up, down, scale)
        dense = self.master.read().to(self.device) if self.master is not None else self.dequantize()
        dense.addmm_(up.float(), down.float(), alpha=scale)
        if self.master is not None:
            self.master.write(dense)
        self.load_dense(dense)
        del dense
        self.probe.observe(self.dequantize())

    @torch.no_grad()
    def add_low_rank_elsewhere(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        """Another rank merges this layer (it keeps the master): record the update in the retention probe only; the
        merged stored form arrives by broadcast, then `observe_stored` samples it."""
        self.probe.add_low_rank(up, down, scale)

    def observe_stored(self) -> None:
        self.probe.observe(self.dequantize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant in FOUR_BIT:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return bnb.matmul_4bit(x, self.packed, quant_state=self.quant_state, bias=bias)
        if self.quant == "int8":
            # Not bnb.matmul: with threshold 0 it quantizes the activations to int8 on CUDA and in CPU eval mode
            # (0.8-6% output error, and an fp16 cast that overflows bf16 activations) but not in CPU training.
            # The weight is int8; the activations stay as they are, on every device and in every mode.
            x = x.to(matmul_dtype(x))
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return Int8WeightLinear.apply(x, self.codes, self.row_absmax, bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def stored_tensors(self) -> list[torch.Tensor]:
        """The stored weight and its statistics (bias excluded), in a fixed order: what a merge replaces."""
        tensors = [b for name, b in self.named_buffers() if name != "bias"]
        if self.quant_state is not None:
            tensors += quant_state_tensors(self.quant_state)
        return tensors

    def stored_bytes(self) -> int:
        """Device bytes of the stored weight and its statistics (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this base keeps, buffers or not: stored form, quant state, master, retention probe."""
        tensors = self.stored_tensors() + [self.probe.start, self.probe.now, self.probe.merged]
        tensors += [self.bias] if self.bias is not None else []
        return tensors + ([self.master.read()] if self.master is not None and self.master.in_memory else [])

    def extra_state(self, with_master: bool = True) -> dict[str, torch.Tensor]:
        """What a checkpoint needs beside the buffers: the bnb quant state (packed, as bnb serializes it for
        safetensors), the fp32 master if it is in RAM and `with_master` (a disk master is linked by the checkpoint)
        and the retention probe, as name -> tensor."""
        tensors = {f"probe.{k}": getattr(self.probe, k) for k in RetentionProbe.TENSORS}
        if self.quant_state is not None:
            tensors.update({f"quant_state.{k}": v for k, v in self.quant_state.as_dict(packed=True).items()})
        if with_master and self.master is not None and self.master.in_memory:
            tensors["master"] = self.master.read()
        return tensors

    @torch.no_grad()
    def load_extra_state(self, tensors: dict[str, torch.Tensor], master_file: Path | None = None,
                         generation: int = 0, sha256: str = "") -> None:
        """The inverse of extra_state, after the buffers are loaded; `master_file` is a checkpoint's disk master of
        merge generation `generation`. A checkpoint without a master (saved with relora.fidelity = naive) starts one
        from the stored weight; a master this base does not keep is dropped."""
        for k in RetentionProbe.TENSORS:
            setattr(self.probe, k, tensors[f"probe.{k}"].clone())
        quant = {k[len("quant_state."):]: v for k, v in tensors.items() if k.startswith("quant_state.")}
        if quant:
            self.quant_state = bnbf.QuantState.from_dict(quant, device=self.device)
            self.quant_state.dtype = self.dtype  # checkpoints of older versions recorded the master's fp32
        if self.master is None:
            return
        if "master" in tensors:
            self.master.restore(tensor=tensors["master"], generation=generation)
        elif master_file is not None:
            self.master.restore(path=master_file, generation=generation, sha256=sha256)
        else:
            self.master.restore(tensor=self.dequantize().cpu(), generation=generation)

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
        where = "" if self.master is None else "in host RAM" if self.master.in_memory else "on disk"
        master = f", fp32 master {where}" if where else ""
        return f"{self.in_features} -> {self.out_features}, quant={self.quant}{master}"


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with `x` runs in: autocast's where it is on, else x's own (the base's input here; the
    output layer's weight in the chunked loss)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def int8_weight(codes: torch.Tensor, row_absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of bnb's row-wise int8 format, codes * absmax / 127, built directly in `dtype` (int8 codes
    are exact in bf16) so the transient is one weight of the compute dtype, not an fp32 one."""
    return codes.to(dtype) * (row_absmax / 127).to(dtype).unsqueeze(1)


class Int8WeightLinear(torch.autograd.Function):
    """y = x W^T + b with W stored as int8 codes and row absmax. Backward rebuilds W instead of saving it: a saved
    dense copy per layer would hold more memory than all the int8 weights."""

    @staticmethod
    def forward(ctx, x, codes, row_absmax, bias):
        ctx.save_for_backward(codes, row_absmax)
        return F.linear(x, int8_weight(codes, row_absmax, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        codes, row_absmax = ctx.saved_tensors
        grad_x = grad_out @ int8_weight(codes, row_absmax, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def quant_state_tensors(state: bnbf.QuantState) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


class RetentionProbe:
    """How much of everything merged into a weight its stored form still holds, measured on a fixed sample of entries.

        retention = <deq(W_now) - deq(W_0), D> / |D|^2,   D = the sum of all merged updates

    1.0 means every update is in the weights; a naive requantization of small updates gives about 0. The exact value
    needs W_0 and D in full (two dense copies per layer); a fixed random sample of `size` entries estimates it for a
    few KB per layer.
    """

    TENSORS = ("rows", "cols", "start", "now", "merged")  # its whole state, for checkpoints

    def __init__(self, weight: torch.Tensor, size: int = 4096, seed: int = 0):
        size = max(1, min(size, weight.numel() // 8))
        generator = torch.Generator().manual_seed(seed)  # its own generator: probing must not shift the run's RNG
        self.rows = torch.randint(weight.shape[0], (size,), generator=generator)
        self.cols = torch.randint(weight.shape[1], (size,), generator=generator)
        self.start = self._sample(weight)
        self.now = self.start.clone()
        self.merged = torch.zeros_like(self.start)

    def _sample(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[self.rows.to(weight.device), self.cols.to(weight.device)].double().cpu()

    def add_low_rank(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        rows, cols = self.rows.to(up.device), self.cols.to(up.device)
        self.merged += scale * (up[rows].float() * down[:, cols].t().float()).sum(1).double().cpu()

    def observe(self, weight: torch.Tensor) -> None:
        self.now = self._sample(weight)

    def terms(self) -> tuple[float, float]:
        """(<deq(W_now) - deq(W_0), D>, |D|^2) on the sample; sum them over layers for a model-wide retention."""
        return float((self.now - self.start) @ self.merged), float(self.merged @ self.merged)
