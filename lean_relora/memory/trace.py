"""A training step traced on fake tensors: the peak live tensor bytes of the very model and optimizer that training
builds, without allocating them.

Under FakeTensorMode every tensor has a shape, dtype and device but no data, so a 1.3B or 7B step runs on a CPU in
seconds. `LiveBytes` counts each op output's storage once and drops it when Python frees it, which is what the caching
allocator sees as live memory; estimate.py adds what lives outside torch's tensors.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from lean_relora.model.build import DTYPES, architecture, build_model
from lean_relora.model.frozen_base import quant_state_tensors
from lean_relora.model.loss import causal_lm_loss
from lean_relora.model.offload import offloading
from lean_relora.model.relora import relora_layers, set_trainable, wrap_model
from lean_relora.recipe import Recipe
from lean_relora.training.distributed import SOLO
from lean_relora.training.optim import build_optimizer
from lean_relora.training.restart import merge_cycle


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes and their peak, counted per storage: every op output's storage is added once and removed
    when Python frees it. Works on real and fake tensors. (torch's MemTracker does this too, plus per-module
    bookkeeping that makes a fake 1.3B step about 15x slower.)"""

    def __init__(self, *known: torch.Tensor):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for tensor in known:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":  # data that lives nowhere (run_step's offloaded activations)
            return
        storage = tensor.untyped_storage()
        if storage in self.sizes:
            return
        nbytes = storage.nbytes()
        self.sizes[storage] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor the model keeps on its device: parameters, buffers and the 4-bit quant states."""
    tensors = list(model.parameters()) + list(model.buffers())
    for layer in relora_layers(model):
        if layer.base.quant_state is not None:
            tensors += quant_state_tensors(layer.base.quant_state)
    return tensors


@dataclass
class Trace:
    peak: int  # bytes, peak live tensor bytes during a steady-state step
    model: int  # bytes of parameters, buffers and quant states
    optimizer: int  # bytes of optimizer state
    micro_batch_size: int


def run_step(model, optimizer, batches: list[torch.Tensor], autocast: bool, loss_chunk_tokens: int,
             offload: bool = False) -> None:
    """A training step as step.train_step does it: micro-batches, accumulated gradients, optimizer step. The
    offloaded activations go to the meta device, which LiveBytes does not count (the trace's CPU is the GPU)."""
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            with offloading(offload, host=torch.device("meta")):
                loss = causal_lm_loss(model, ids, loss_chunk_tokens)
        (loss / len(batches)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_for_phase(recipe: Recipe, vocab_size: int, phase: str):
    """The model and optimizer of a phase: "relora" (quantized base + LoRA) or "full" (dense, all trainable)."""
    model = build_model(recipe.model, vocab_size, recipe.data.seq_len, config=architecture(recipe.model, vocab_size))
    if phase == "relora":
        # The fp32 master lives in host RAM, so it is left out here and counted as host memory.
        wrap_model(model, recipe.lora, keep_master=False, dtype=DTYPES[recipe.model.dtype],
                   projected=recipe.relora.cycle == "projected")
        set_trainable(model, recipe.lora)
    with unset_fake_temporarily():  # bnb builds its quantization maps with .tolist(), which fake tensors refuse
        optimizer = build_optimizer(model, recipe.optim, torch.device("cpu"))
    return model, optimizer


def trace(recipe: Recipe, vocab_size: int, phase: str = "relora", micro_batch_size: int | None = None,
          autocast: bool | None = None, fake: bool = True) -> Trace:
    """Peak live bytes of a steady-state training step. fake=False runs the same step for real (tests use that).

    Steady state is set up without a first real step: zero gradients and one optimizer step create the optimizer
    state; with gradient accumulation the gradients are then kept (zeroed), as the second and later micro-batches
    find them; one micro-batch's forward, backward and optimizer step are then measured.
    """
    micro_batch_size = micro_batch_size or recipe.train.micro_batch_size
    autocast = uses_autocast(recipe) if autocast is None else autocast
    if fake:
        bnbf.quantize_4bit(torch.zeros(64, 64), compress_statistics=True)  # bnb caches its dynamic map, for real
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        torch.manual_seed(recipe.train.seed)
        model, optimizer = build_for_phase(recipe, vocab_size, phase)
        # Measured after a restart, as most of a run is: a merge requantizes every base (what it records then is
        # what the forward and backward of every later step dequantize to).
        merge_cycle(model, SOLO)
        model.train()
        ids = torch.randint(0, vocab_size, (micro_batch_size, recipe.data.seq_len))
        tracker = LiveBytes(*model_tensors(model), ids)
        with tracker:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=recipe.train.grad_accum_steps == 1)
            tracker.reset_peak()
            run_step(model, optimizer, [ids], autocast, recipe.train.loss_chunk_tokens,
                     recipe.train.offloads and fake)  # real tensors cannot come back from meta
        optimizer_bytes = sum(t.untyped_storage().nbytes() for state in optimizer.state.values()
                              for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 256)
        model_bytes = sum(t.untyped_storage().nbytes() for t in model_tensors(model))
    return Trace(tracker.peak, model_bytes, optimizer_bytes, micro_batch_size)


def uses_autocast(recipe: Recipe) -> bool:
    """The estimate is for the GPU run: bf16 autocast unless the recipe turns it off or trains on the CPU."""
    return recipe.train.autocast == "bf16" or (recipe.train.autocast == "auto" and recipe.train.device != "cpu")
