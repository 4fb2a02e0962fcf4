"""ReLoRA: low-rank factors on a frozen (quantized) base, merged into it and re-initialised at every restart.

Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates" (arXiv 2307.05695). Each cycle trains a
rank-r update; merging it into the base and starting again from fresh factors makes the sum of cycles high-rank.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.master import DiskMaster, DiskMasters, MasterStore, RamMaster
from lean_relora.recipe import LoraConfig, RecipeError
from lean_relora.sysmem import release_freed_memory


class ReLoRALinear(nn.Module):
    """A linear layer trained as a frozen base plus a low-rank update.

        y = base(x) + s * B A dropout(x),   s = alpha / r
        A: r x in (Kaiming-uniform init), B: out x r (zero init), so y = base(x) at every (re)start.

    `merge_and_reinit` folds the update into the base, W <- W + s B A, and starts a new cycle from fresh A and B = 0.
    Only A is random: zeroing both factors would leave them without a gradient (dL/dA = s B^T g x^T = 0 while B = 0,
    and dL/dB = s g (A x)^T = 0 while A = 0), a bug of the original code on warm starts.

    `transposed`: the layer replaced a transformers Conv1D (GPT-2 family), which stores W^T (in x out) and computes
    the same x W^T + b; the base holds W as (out x in) like any other, and export writes W^T back.

    `projected` (relora.cycle = "projected"): A has orthonormal rows and stays frozen (requires_grad False, so the
    optimizer holds neither its gradient nor its moments); only B trains. Then dL/dB = s G A^T is GaLore's projected
    gradient R = G P with P = A^T, Adam on B is Adam on R, and W + s B A is GaLore's weight after the same updates,
    with GaLore's `scale` = s = alpha / r (Zhao et al., arXiv 2403.03507, Algorithm 2, right projection). A random
    (re)start draws a random orthonormal basis; relora.init = "gradient" sets the gradient's top-r right singular
    vectors, GaLore's own choice of P.
    """

    def __init__(self, base: FrozenBase, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.bfloat16, generator: torch.Generator | None = None,
                 transposed: bool = False, projected: bool = False):
        super().__init__()
        self.base, self.transposed, self.projected = base, transposed, projected
        self.rank, self.scale = rank, alpha / rank
        device = base.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora(generator)

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        # nn.Linear's own init for A (a = sqrt(5)); drawn in fp32 on the CPU so a seed gives the same A everywhere.
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        if self.projected:  # the same draw, its rows made orthonormal: a random r-dimensional subspace of R^in
            a = orthonormal_rows(a)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        # Added into the base's output in place: the base's product is saved by nothing (its backward needs only
        # the weight), and `base(x) + s * lora` would hold four output-wide tensors at once instead of two. In a
        # 1.3B block's MLP that is 85 MiB less at the moment gradient checkpointing recomputes it.
        out = self.base(x)
        if out._base is not None:  # a view (bnb's 4-bit matmul or the int8 layer, with a bias): autograd forbids it
            return torch.add(out, lora.to(out.dtype), alpha=self.scale)
        return out.add_(lora.to(out.dtype), alpha=self.scale)

    @torch.no_grad()
    def merge(self, here: bool = True) -> None:
        """W <- W + s B A, in fp32 from the master where there is one. `here=False`: another rank keeps this layer's
        master and merges it; this one only records the update (its stored base arrives by broadcast)."""
        if here:
            self.base.add_low_rank_(self.lora_B, self.lora_A, self.scale)
        else:
            self.base.add_low_rank_elsewhere(self.lora_B, self.lora_A, self.scale)

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator | None = None) -> None:
        """W <- W + s B A (in fp32), then a fresh cycle: A re-drawn, B = 0."""
        self.merge()
        self.reset_lora(generator)

    def trainable_factors(self) -> tuple[nn.Parameter, ...]:
        """The factors the optimizer updates: A and B, or B alone when the layer is projected (A frozen)."""
        return (self.lora_B,) if self.projected else (self.lora_A, self.lora_B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}" + (", projected (A frozen)" if self.projected else "")


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """The rows of `a` (r x in, r <= in) made orthonormal, spanning the same subspace (QR of a^T, signs fixed so that
    the result does not depend on the QR routine's sign convention)."""
    q, r = torch.linalg.qr(a.t().double())
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).t().to(a.dtype)


PROJECTIONS = (nn.Linear, Conv1D)  # the layers ReLoRA wraps; Conv1D is nn.Linear with W stored transposed
FROZEN_WARNING = 0.10  # share of the decoder blocks' weight matrices left out of the targets above which we warn


def is_target(name: str, targets: list[str]) -> bool:
    """A module is a target when its last name component matches one of the patterns (full regex match); every
    module is one when there are no patterns (lora.targets = [], the default)."""
    leaf = name.rsplit(".", 1)[-1]
    return not targets or any(re.fullmatch(pattern, leaf) for pattern in targets)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder blocks: the ModuleList holding the most parameters (model.layers in
    LLaMA, Qwen, Mistral, Gemma and Phi-3, transformer.h in GPT-2), found rather than named per architecture."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise RecipeError(f"{type(model).__name__}: has no list of decoder blocks (nn.ModuleList) to put ReLoRA in")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def target_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear and Conv1D inside the decoder blocks that `targets` selects: all of them
    when it is empty; RecipeError when it selects none. lm_head and the embeddings are outside the blocks; they
    train full-rank (set_trainable)."""
    prefix, blocks = decoder_blocks(model)
    selected = [(f"{prefix}.{n}", m) for n, m in blocks.named_modules()
                if isinstance(m, PROJECTIONS) and is_target(n, targets)]
    if not selected:
        raise RecipeError(f"lora.targets = {targets}: no nn.Linear or Conv1D inside the decoder blocks matches; "
                          "name module suffixes such as q_proj or c_attn, a regex, or [] for all of them")
    return selected


def target_summary(model: nn.Module, targets: list[str]) -> tuple[str, str | None]:
    """A line saying what `targets` selects (layers, their share of the decoder blocks' weight matrices), and a
    warning line when more than FROZEN_WARNING of those weights would stay frozen (never trained), else None."""
    selected = target_modules(model, targets)
    _, blocks = decoder_blocks(model)
    total = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
    share = sum(m.weight.numel() for _, m in selected) / max(total, 1)
    kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in selected})
    which = "all block projections" if not targets else f"lora.targets = {targets}"
    line = (f"ReLoRA layers: {len(selected)} ({which}: {', '.join(kinds)}), {share:.0%} of the decoder blocks' "
            "weight matrices")
    warning = None
    if 1 - share > FROZEN_WARNING:
        warning = (f"lora.targets = {targets} leaves {1 - share:.0%} of the decoder blocks' weight matrices frozen "
                   f"(they never train; more than {FROZEN_WARNING:.0%}); set lora.targets = [] for every block "
                   "projection")
    return line, warning


def wrap_model(model: nn.Module, cfg: LoraConfig, keep_master: bool, dtype: torch.dtype,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               master_store: MasterStore | None = None,
               materialize: Callable[[str, nn.Module], None] | None = None, owned: set[str] | None = None,
               projected: bool = False) -> list[str]:
    """Replace every target nn.Linear or Conv1D by a ReLoRALinear on `device`, one layer at a time so that only one
    dense weight is ever on the device beside the quantized ones. With `keep_master` each base keeps an fp32 master,
    in host RAM or, given `master_store`, on disk. `materialize(name, layer)` fills a target's weights just before it
    is quantized (streamed.py: a pretrained model read one layer at a time). `owned`: the layers whose master this
    process keeps (distributed.py: each master on one rank); None: all. `projected`: relora.cycle = "projected" (A
    orthonormal and frozen, ReLoRALinear). Returns the names of the wrapped modules."""
    names = [n for n, _ in target_modules(model, cfg.targets)]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, leaf)
        if materialize is not None:
            materialize(name, layer)
        transposed = isinstance(layer, Conv1D)
        weight = layer.weight.t().contiguous() if transposed else layer.weight  # (out, in) either way
        master = None
        if keep_master and (owned is None or name in owned):
            master = master_store.create(name, weight) if master_store else RamMaster(weight)
        base = FrozenBase(weight.to(device), layer.bias, cfg.quant, cfg.blocksize, cfg.double_quant,
                          dtype=dtype, master=master)
        setattr(parent, leaf, ReLoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, dtype, generator, transposed,
                                                  projected))
        del layer, weight
        release_freed_memory()
    return names


def relora_layers(model: nn.Module) -> list[ReLoRALinear]:
    return [m for m in model.modules() if isinstance(m, ReLoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors that train: A and B of every layer, only B of a projected one (its A is state, not trained:
    checkpoints save it with the model)."""
    return [p for layer in relora_layers(model) for p in layer.trainable_factors()]


def retention(model: nn.Module) -> float:
    """The share of every update merged so far that the stored bases still hold (frozen_base.RetentionProbe), over
    all layers: 1.0 = nothing rounded away."""
    terms = [layer.base.probe.terms() for layer in relora_layers(model)]
    return sum(t[0] for t in terms) / max(sum(t[1] for t in terms), 1e-300)


def disk_master_stores(model: nn.Module) -> list[DiskMasters]:
    """The stores holding the model's disk masters, each once."""
    stores = {id(m.store): m.store for layer in relora_layers(model) if isinstance(m := layer.base.master, DiskMaster)}
    return list(stores.values())


def set_trainable(model: nn.Module, cfg: LoraConfig) -> None:
    """LoRA factors train; the base is frozen; embeddings (token and position), norms and lm_head train full-rank
    unless frozen. Norms are found by their class (LlamaRMSNorm, GPT-2's LayerNorm ln_1...), not by name."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    embeddings |= {id(p) for p in model.get_input_embeddings().parameters()}
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    lora = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        if id(p) in lora:
            p.requires_grad_(True)
        elif id(p) in embeddings:
            p.requires_grad_(cfg.train_embeddings)
        elif id(p) in head_params:
            p.requires_grad_(cfg.train_lm_head)
        elif id(p) in norms:
            p.requires_grad_(cfg.train_norms)
        else:
            p.requires_grad_(False)
