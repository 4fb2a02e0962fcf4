"""The restart: the one routine that ends a ReLoRA cycle and begins the next, for one process and several ranks alike.

    1. merge       W <- W + s B A in every layer, from its fp32 master where it keeps one. With several ranks each
                   rank merges the layers whose master it keeps (Ranks.owners; one process owns them all) and every
                   merged base is then broadcast from its owner (Ranks.broadcast_bases).
    2. re-init     A re-drawn, B = 0, in layer order from the run's generator: the same draws on every rank.
    3. masters     the previous generation of disk masters is collected (checkpoints that link it keep it).
    4. optimizer   the factors' moments pruned (relora.reset, relora.reset_ratio).
    5. init        relora.init = "gradient": A from the gradient of the merged model (model/gradinit.py).
    6. record      merge seconds, the retention of every merge so far, with relora.check_ranks a digest of the bases.

The loop decides when (training/loop.py); what a restart does is here and nowhere else.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lean_relora.model.gradinit import init_from_gradient
from lean_relora.model.relora import disk_master_stores, lora_parameters, relora_layers, retention
from lean_relora.sysmem import release_freed_memory
from lean_relora.training.distributed import Ranks
from lean_relora.training.optim import reset_state
from lean_relora.training.run import Run
from lean_relora.training.step import autocast_context, micro_batch_loss


@torch.no_grad()
def merge_cycle(model: nn.Module, ranks: Ranks, generator: torch.Generator | None = None) -> None:
    """Steps 1 and 2: every layer merged (one at a time, so the transient is one layer's dense copy) and re-drawn."""
    layers = relora_layers(model)
    owners = ranks.owners([layer.base.in_features * layer.base.out_features for layer in layers])
    for layer, owner in zip(layers, owners):
        layer.merge(here=owner == ranks.rank)
        release_freed_memory()
    ranks.broadcast_bases(layers, owners)
    for layer, owner in zip(layers, owners):
        if owner != ranks.rank:  # the retention probe samples the base the owner merged
            layer.base.observe_stored()
    for layer in layers:
        layer.reset_lora(generator)


def restart(run: Run) -> dict:
    """Steps 1-6. Returns the restart's record (metrics.jsonl): step, restart, retention, merge_seconds, and with a
    gradient init its tokens and seconds."""
    start = time.perf_counter()
    merge_cycle(run.model, run.ranks, run.generator)
    for store in disk_master_stores(run.model):
        store.collect()
    relora = run.recipe.relora
    reset_state(run.optimizer, lora_parameters(run.model), relora.reset, relora.reset_ratio, run.generator)
    run.state.restarts += 1
    init = gradient_init(run) if relora.init == "gradient" else {}
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    record = {"step": run.state.step, "restart": run.state.restarts, "retention": retention(run.model), **init,
              "merge_seconds": time.perf_counter() - start - init.get("init_seconds", 0.0)}
    if run.ranks.several and relora.check_ranks:
        record["bases_sha256"] = run.ranks.check_identical(relora_layers(run.model))
    return record


def gradient_init(run: Run) -> dict:
    """relora.init = "gradient": each layer's A from its weight gradient under the step's own loss, over the next
    relora.init_batches micro-batches of the data order (so a resumed run takes the same ones), both passes counted
    in the run's tokens. Also when ReLoRA follows a warm start. Returns the record for the restart's line."""
    start, state = time.perf_counter(), run.state
    run.model.train()  # as the step runs it (gradient checkpointing is on only in training mode)
    batches = []
    for _ in range(run.recipe.relora.init_batches):
        ids, state.data = run.loader.get(state.micro_batches)
        batches.append(ids.to(run.device, non_blocking=True))
        state.micro_batches += 1

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with autocast_context(run.recipe, run.device):
            return micro_batch_loss(run, ids)

    init_from_gradient(run.model, batches, loss_of, run.generator)
    tokens = 2 * sum(ids.numel() for ids in batches)
    state.tokens += tokens
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return {"init_seconds": time.perf_counter() - start, "init_tokens": tokens}
