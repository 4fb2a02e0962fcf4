"""The optimizer (bitsandbytes 8-bit AdamW by default) and the ReLoRA partial reset of its state.

bnb's 8-bit state is not a tensor of moments: `state1`/`state2` are uint8 indices into a 256-entry map (`qmap1`
signed, `qmap2` unsigned) scaled by one fp32 `absmax` per block of 256 elements. In the signed map code 0 is about
-absmax, so zeroing or magnitude-pruning the raw codes corrupts the moments. The reset therefore works in value
space: dequantize per block, prune, quantize again with the same map.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

from lean_relora.recipe import OptimConfig

BNB_BLOCKSIZE = 256  # bnb's blockwise 8-bit optimizer state block, in elements
MOMENTS = (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2"))  # bnb 8-bit
TORCH_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, paged: bool = True
                    ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not.

    `paged=False` keeps a paged_adamw8bit recipe's state in ordinary device memory: bnb never frees paged state (every
    buffer stays in its GlobalPageManager's list, and `get_paged` has no free path), so an optimizer that is dropped
    during the run, the full-rank warm start's, must not page or its state would hold the GPU to the end."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if device.type == "cpu":
        # Paging needs CUDA unified memory (elsewhere bnb falls back to ordinary state and warns every step).
        return SlicedAdamW8bit(groups, **kwargs)
    cls = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw8bit" and paged else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


def paged_bytes_held() -> int:
    """Bytes of paged optimizer state this process holds (CUDA managed memory, invisible to torch's counters): every
    buffer bnb ever paged, since none is freed."""
    held = bnbf.GlobalPageManager.get_instance().paged_tensors
    return sum(t.numel() * t.element_size() for t in held)


class SlicedAdamW8bit(bnb.optim.AdamW8bit):
    """bnb's AdamW8bit, stepping large tensors in slices: for the CPU.

    bnb's CPU kernel updates a tensor through fp32 copies of it, its gradient and both moments, 26 bytes per element
    at once (1.6 GiB for a 32k x 2048 embedding); CUDA's kernel is fused. The update is elementwise within blocks of
    256 elements (one absmax each), so slices aligned to blocks compute exactly what one call would."""

    slice_elements = 4096 * BNB_BLOCKSIZE  # about 26 MiB of transients per slice

    def update_step(self, group, p, gindex, pindex):
        state = self.state[p]
        if state["state1"].dtype != torch.uint8 or p.numel() <= self.slice_elements:
            return super().update_step(group, p, gindex, pindex)
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        flat = [t.view(-1) for t in (p.grad, p.data, state["state1"], state["state2"])]
        beta1, beta2, *beta3 = config["betas"]
        for start in range(0, p.numel(), self.slice_elements):
            part = slice(start, start + self.slice_elements)
            blocks = slice(start // BNB_BLOCKSIZE, (start + self.slice_elements) // BNB_BLOCKSIZE)
            bnbf.optimizer_update_8bit_blockwise(
                self.optimizer_name, *(t[part] for t in flat), beta1, beta2, beta3[0] if beta3 else 0.0,
                config.get("alpha", 0.0), config["eps"], state["step"], config["lr"], state["qmap1"], state["qmap2"],
                state["absmax1"][blocks], state["absmax2"][blocks], config["weight_decay"], gnorm_scale=1.0,
                skip_zeros=config["skip_zeros"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], mode: str, ratio: float,
                generator: torch.Generator | None = None) -> None:
    """Partly forget the moments of `params` (the LoRA factors) at a restart.

    magnitude: zero the `ratio` share of entries with the smallest |value| (per tensor, per moment);
    random: zero each entry with probability `ratio`; zero: zero everything; keep: nothing (GaLore keeps its moments
    when it switches subspace). The step count is kept.
    Wherever the second moment ends up zero the first moment is zeroed too: Adam's step m / (sqrt(v) + eps) would
    otherwise be m / eps, a step of about lr * 1e8 on the first update after the restart.
    """
    if mode == "keep":
        return
    for p in params:
        if not optimizer.state.get(p):
            continue
        first, second = moments(optimizer, p)
        second = _prune(second, mode, ratio, generator)
        first = _prune(first, mode, ratio, generator) * (second != 0)
        _store_moments(optimizer, p, first, second)


def moments(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second moments of `p` as fp32 values, whatever the optimizer stores."""
    state = optimizer.state[p]
    if TORCH_MOMENTS[0] in state:
        return tuple(state[k].float() for k in TORCH_MOMENTS)
    out = []
    for codes_key, absmax_key, map_key in MOMENTS:
        codes = state[codes_key].to(p.device)  # see _store_moments: paged state is copied, never computed on
        if codes.dtype != torch.uint8:  # bnb keeps tensors under 4096 elements in fp32
            out.append(codes.float())
        else:
            out.append(bnbf.dequantize_blockwise(codes, absmax=state[absmax_key].to(p.device),
                                                 code=state[map_key].to(p.device), blocksize=BNB_BLOCKSIZE))
    return tuple(out)


def _store_moments(optimizer: torch.optim.Optimizer, p: torch.Tensor, *values: torch.Tensor) -> None:
    """Write moments computed on p's device back into the optimizer's own buffers with copy_. A paged bnb buffer is
    a CPU-device tensor over CUDA unified memory: handed to a bnb function it would make bnb run a CUDA kernel on a
    host pointer, so the arithmetic happens on a device copy and only copy_ touches the paged buffer."""
    state = optimizer.state[p]
    if TORCH_MOMENTS[0] in state:
        for key, value in zip(TORCH_MOMENTS, values):
            state[key].copy_(value)
        return
    for (codes_key, absmax_key, map_key), value in zip(MOMENTS, values):
        codes = state[codes_key]
        if codes.dtype != torch.uint8:
            codes.copy_(value)
            continue
        qmap = state[map_key].to(value.device)
        new_codes, quant = bnbf.quantize_blockwise(value, code=qmap, blocksize=BNB_BLOCKSIZE)
        # bnb's quantizer sends 0 to a tiny non-zero neighbour code; pruned entries get the map's exact zero.
        new_codes[value == 0] = qmap.abs().argmin().to(torch.uint8)
        codes.copy_(new_codes)
        state[absmax_key].copy_(quant.absmax)


def _prune(values: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    if mode == "zero" or ratio >= 1.0:
        return torch.zeros_like(values)
    if mode == "magnitude":
        k = int(values.numel() * ratio)
        if k == 0:
            return values
        threshold = values.abs().flatten().kthvalue(k).values
        return values * (values.abs() > threshold)
    if mode == "random":
        keep = torch.rand(values.shape, generator=generator, device="cpu").to(values.device) >= ratio
        return values * keep
    raise ValueError(f"unknown reset mode {mode!r}")



PAGED_KEYS = ("state1", "state2")  # the buffers a paged bnb optimizer allocates in CUDA unified memory


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The per-parameter state in param_groups order: tensors as "<index>.<key>" copied to ordinary CPU memory (paged
    bnb state included; 8-bit codes, absmax and qmaps as they are), and per parameter its shape and scalar state."""
    tensors, params = {}, []
    for i, p in enumerate(optimizer_params(optimizer)):
        scalars = {}
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{key}"] = value.detach().to("cpu", copy=True)
            else:
                scalars[key] = value
        params.append({"shape": list(p.shape), "scalars": scalars})
    return tensors, params


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         params: list[dict]) -> None:
    """The inverse of optimizer_state, into a freshly built optimizer over the same parameters. Dtypes are kept as
    saved (torch's load_state_dict would cast bnb's fp32 state of small bf16 parameters to bf16), and state that bnb
    pages is allocated paged again. The param groups' hyper-parameters stay those of the recipe."""
    own = optimizer_params(optimizer)
    if [list(p.shape) for p in own] != [d["shape"] for d in params]:
        raise ValueError(f"the optimizer holds {len(own)} parameters with other shapes than the saved {len(params)}")
    grouped: dict[int, dict] = {i: dict(d["scalars"]) for i, d in enumerate(params)}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        p = own[int(index)]
        if getattr(optimizer, "is_paged", False) and key in PAGED_KEYS and p.device.type == "cuda":
            buffer = optimizer.get_state_buffer(p, dtype=value.dtype)  # paged where bnb would page it
            buffer.copy_(value)
            value = buffer
        grouped[int(index)][key] = value if getattr(value, "is_paged", False) else value.to(state_device(
            optimizer, p, key))
    for i, state in grouped.items():
        if state:
            optimizer.state[own[i]] = state


def state_device(optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.device:
    """Where the optimizer itself keeps state `key` of `p`: torch's AdamW keeps its `step` counter on the CPU (unless
    capturable or fused); on the GPU it would cost a host sync per parameter per step. Everything else on p's
    device."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    if key == "step" and not (group.get("capturable") or group.get("fused")):
        return torch.device("cpu")
    return p.device


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates, in param_groups order (the order its saved state is indexed by)."""
    return [p for group in optimizer.param_groups for p in group["params"]]
