"""Peak host RAM of a recipe, by phase: loading the model, training, and a merge at a restart.

What lives in host RAM beside the GPU (names as in the table memory-estimate prints):
    process      the interpreter with torch, transformers, datasets and bitsandbytes loaded, the data pipeline and
                 what the first steps bring in (measured: 0.52 GiB beyond the tensors)
    masters      the fp32 masters in RAM (relora.master = "ram"): 4 bytes per base weight; on disk: none
    setup        a pretrained local safetensors model streamed into ReLoRA form (streamed.py): one dense layer and its
                 fp32 copy at a time; otherwise (random init, a warm start, a hub model) the whole dense model
    merge        a disk master maps one layer's file and writes the next generation from a copy: 2 x 4 bytes per
                 weight of the largest layer
    device       on a CPU the "device" is host RAM too: the training step's peak (with bnb's CPU 8-bit AdamW, which
                 steps a tensor through fp32 copies), or at a merge the model and optimizer state
    offloaded    on a GPU with train.offload_activations, the activations a step keeps in pinned host RAM
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lean_relora.memory.analytic import GIB, analytic, recipe_vocab_size, target_shapes, with_model_sizes
from lean_relora.model.streamed import streams
from lean_relora.recipe import Recipe
from lean_relora.training.distributed import Ranks
from lean_relora.training.optim import SlicedAdamW8bit

# A training process beyond its tensors: the interpreter and libraries (466 MiB right after the imports), plus the
# data pipeline, the tokenizer and the code pages and kernel caches of the first steps (`bench/process_memory.py`:
# the tiny recipe's RSS after setup and 3 steps, minus its live tensors).
PROCESS_BYTES = 533 * 2**20
# bitsandbytes' CPU 8-bit AdamW updates a tensor through fp32 copies of it, its gradient and both moments: measured
# 26 bytes per element stepped at once (a whole 32128 x 2048 embedding: +1.6 GiB; optim.SlicedAdamW8bit steps at most
# a million elements at a time). CUDA's kernel is fused.
CPU_8BIT_STEP_BYTES = 26


@dataclass
class HostRam:
    """Bytes of host RAM per phase; `peak` is what must be available."""

    process: int
    masters: int  # resident through the whole run
    setup: int  # beyond process and masters, at the worst moment of loading
    training: int  # beyond process and masters, during a step
    merge: int  # beyond process and masters, during a restart
    masters_total: int = -1  # masters of all ranks together (training/distributed.py: each on one rank); -1: `masters`

    def __post_init__(self):
        if self.masters_total < 0:
            self.masters_total = self.masters

    @property
    def peak(self) -> int:
        return self.process + self.masters + max(self.setup, self.training, self.merge)

    def rows(self) -> dict[str, int]:
        return {"process (Python, torch and the libraries)": self.process,
                "fp32 masters kept in RAM": self.masters,
                "+ loading the model (worst moment)": self.setup,
                "+ a training step": self.training,
                "+ a merge at a restart": self.merge,
                "peak": self.peak}


def host_ram(recipe: Recipe, target_numels: list[int], other_params: int, device_step_peak: int,
             device_resident: int, largest_trainable: int = 0, gradients: int = 0, offloaded: int = 0) -> HostRam:
    """`target_numels`: weights of each ReLoRA target; `other_params`: every other weight of the model;
    `device_step_peak`: the traced peak of a training step; `device_resident`: the model and optimizer bytes on the
    device between steps (used when the device is the CPU); `largest_trainable`: elements of the largest tensor the
    optimizer updates; `gradients`: bytes of all gradients at once; `offloaded`: activations a GPU step keeps in
    host RAM (train.offload_activations)."""
    weight = 2 if recipe.model.dtype == "bf16" else 4
    keeps_master = recipe.keeps_master
    on_cpu = recipe.train.device == "cpu"
    cpu_8bit = recipe.optim.name != "adamw"
    on_disk = keeps_master and recipe.relora.master == "disk"
    largest = max(target_numels)
    masters = 4 * sum(target_numels) if keeps_master and not on_disk else 0
    if streams(recipe):  # one dense layer (read, then quantized) and its fp32 master copy while it is written
        setup = largest * (weight + 4 * keeps_master) + (device_resident if on_cpu else 0)
    else:  # the dense model; as each target is wrapped its dense weight goes and its RAM master comes
        dense_targets = weight * sum(target_numels)
        setup = weight * other_params + max(dense_targets - masters, 0) + 4 * largest * keeps_master
    stepped_at_once = min(largest_trainable, SlicedAdamW8bit.slice_elements)
    # The optimizer step comes when every gradient exists: with few tokens per step (a CPU run) that moment, not the
    # start of backward that the GPU-shaped step peak describes, can be the highest.
    step = max(device_step_peak, device_resident + gradients)
    training = step + (CPU_8BIT_STEP_BYTES * stepped_at_once if cpu_8bit else 0) if on_cpu else offloaded
    merge = 2 * 4 * largest * on_disk + (device_resident if on_cpu else 0)
    return HostRam(PROCESS_BYTES, masters, setup, training, merge)


def on_one_host(host: HostRam, nproc: int) -> int:
    """Peak host RAM of `nproc` ranks on one host (`host`: one rank's, its share of the masters included): each
    rank is a process with its own transients, in lockstep, so their peaks coincide; the masters are there once,
    split among them."""
    return nproc * (host.peak - host.masters) + host.masters_total


RESIDENT = ("frozen base (stored)", "frozen full-rank weights", "frozen projections (A)", "trainable weights",
            "optimizer state")


def host_estimate(recipe: Recipe, vocab: int, nproc: int = 1) -> HostRam:
    """Host RAM by phase (host_ram.py) of one of `nproc` ranks, from the analytic model alone: quick enough for train's
    pre-start check. A rank keeps the masters training/distributed.py assigns it: the largest share counts."""
    shapes, m = target_shapes(recipe, vocab), recipe.model
    others = (2 * m.num_layers + 1 + vocab * (1 if m.tie_embeddings else 2)) * m.hidden_size
    relora = analytic(recipe, vocab)
    step = max(sum(relora.values()), sum(analytic(recipe, vocab, "full").values()) if
               recipe.relora.warm_start_steps else 0)
    embedding = vocab * m.hidden_size
    largest = max(max(o * i for o, i in shapes) if recipe.relora.warm_start_steps else 0,
                  embedding if recipe.lora.train_embeddings or recipe.lora.train_lm_head else 0,
                  max(recipe.lora.rank * max(o, i) for o, i in shapes))
    offloaded = offloaded_bytes(recipe) if recipe.train.offloads else 0
    host = host_ram(recipe, [o * i for o, i in shapes], others, step, sum(relora.get(k, 0) for k in RESIDENT), largest,
                    relora["trainable weights"], offloaded)
    if nproc > 1 and host.masters:
        owners = Ranks(0, nproc).owners([o * i for o, i in shapes])
        share = max(sum(4 * o * i for (o, i), rank in zip(shapes, owners) if rank == r) for r in range(nproc))
        host = replace(host, masters=share, masters_total=host.masters)
    return host


def offloaded_bytes(recipe: Recipe) -> int:
    """Host bytes train.offload_activations holds at the start of backward: every block's input and the final
    hidden states the loss keeps, in the model's dtype, and what the final RMSNorm saves (two fp32 tensors and one
    in the model's dtype; tests/model/test_offload.py counts them)."""
    m = recipe.model
    w = 2 if m.dtype == "bf16" else 4
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    return tokens * m.hidden_size * (w * (m.num_layers + 2) + 8)


def host_refusal(recipe: Recipe, available: int, nproc: int = 1) -> str | None:
    """Why `train` should not start with `available` bytes of host RAM (shared by `nproc` ranks), or None when the
    recipe fits."""
    recipe = with_model_sizes(recipe)
    host = host_estimate(recipe, recipe_vocab_size(recipe), nproc)
    need = on_one_host(host, nproc)
    if need <= available:
        return None
    advice = 'set relora.master = "disk", ' if host.masters_total else ""
    return (f"the recipe needs about {need / GIB:.1f} GiB of host RAM at its peak, {available / GIB:.1f} GiB "
            f"are available (lean-relora memory-estimate shows the breakdown); {advice}free memory, or pass --force "
            "to start anyway")
