"""One training step and one evaluation of a built run (train.setup): micro-batches, gradient accumulation, the
loss as training computes it (chunked, activations offloaded), the optimizer step with its NaN/inf skip.

loop.py owns the order of events; this module is what each step does, so that memory/measure.py and the benchmarks run
the very same step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from lean_relora.data.packing import document_positions
from lean_relora.model.loss import causal_lm_loss
from lean_relora.model.offload import offloading
from lean_relora.recipe import Recipe, RecipeError
from lean_relora.sysmem import release_freed_memory
from lean_relora.training.distributed import SOLO, Ranks
from lean_relora.training.optim import optimizer_params
from lean_relora.training.run import BatchSource, Run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device = 'cuda': no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_context(recipe: Recipe, device: torch.device):
    mode = recipe.train.autocast
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16" else nullcontext()


def train_step(run: Run) -> float:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the mean loss over its tokens."""
    recipe, state = run.recipe, run.state
    run.model.train()
    total = torch.zeros((), device=run.device)
    ranks = run.ranks
    for micro in range(recipe.train.grad_accum_steps):
        ids, state.data = run.loader.get(state.micro_batches + ranks.rank)  # rank r of N: r, r + N, ...
        ids = ids.to(run.device, non_blocking=True)
        # DDP averages the gradients over the ranks once, in the step's last backward.
        last = run.ddp is None or micro == recipe.train.grad_accum_steps - 1
        with nullcontext() if last else run.ddp.no_sync():
            with autocast_context(recipe, run.device):
                loss = micro_batch_loss(run, ids) if run.ddp is None else run.ddp(ids)
            # Every micro-batch has the same number of predicted tokens, so the mean of means is the exact token mean.
            (loss / recipe.train.grad_accum_steps).backward()
        total += loss.detach()
        state.micro_batches += ranks.size
        state.tokens += ids.numel() * ranks.size
    # Every rank reports, and decides a skip on, the mean over all ranks' tokens.
    loss = ranks.total(total).item() / (recipe.train.grad_accum_steps * ranks.size)
    params = optimizer_params(run.optimizer)
    # The norm is taken even without clipping (an infinite max_norm scales by exactly 1): a finite loss can still
    # give an inf gradient, and one such update would leave NaN weights behind.
    norm = nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip or math.inf)
    if math.isfinite(loss) and math.isfinite(norm):
        run.optimizer.step()
        state.bad_steps = 0
    else:  # skip: no update, moments untouched; the step and its micro-batches are spent
        state.skipped += 1
        state.bad_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cpu":
        release_freed_memory()  # the step's activations and gradients were host RAM: give it back, not keep it
    state.step += 1
    return loss


def wrap_for_ranks(run: Run):
    """run.ddp for the model that trains now: DistributedDataParallel over micro_batch_loss; None for one process."""
    return run.ranks.wrap(run.model, lambda model, ids: micro_batch_loss(run, ids, model))


def micro_batch_loss(run: Run, ids: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """The mean next-token loss of one micro-batch of the run; `model`: run.model as DDP hands it over (run.ddp's
    forward is this function)."""
    return batch_loss(model or run.model, run.recipe, run.device, ids, run.data.eos_token_id)


def batch_loss(model: nn.Module, recipe: Recipe, device: torch.device, ids: torch.Tensor,
               eos_token_id: int | None) -> torch.Tensor:
    """The mean next-token loss of one micro-batch (ids: batch x seq_len) as training and every evaluation compute
    it: chunked (train.loss_chunk_tokens), activations offloaded where the recipe says, positions restarting at each
    document where data.document_mask says."""
    positions = document_positions(ids, eos_token_id) if recipe.data.document_mask else None
    with offloading(recipe.train.offloads and device.type == "cuda"):
        return causal_lm_loss(model, ids, recipe.train.loss_chunk_tokens, position_ids=positions)


def evaluate(run: Run) -> float:
    """The run's eval loss now (eval_loss over its own data and ranks)."""
    return eval_loss(run.model, run.recipe, run.device, run.data, run.ranks)


@torch.no_grad()
def eval_loss(model: nn.Module, recipe: Recipe, device: torch.device, data: BatchSource, ranks: Ranks = SOLO) -> float:
    """Mean loss over the data's fixed eval blocks (recipe.eval.batches micro-batches), each rank a share of them:
    what a run logs and what `lean-relora eval` reports of a checkpoint."""
    model.eval()
    losses = []
    batches = data.eval_batches(recipe.train.micro_batch_size, recipe.eval.batches)
    for ids in batches[ranks.rank::ranks.size]:
        ids = ids.to(device)
        with autocast_context(recipe, device):
            losses.append(batch_loss(model, recipe, device, ids, data.eos_token_id).float().item())
    model.train()
    total, count = ranks.sum(sum(losses), len(losses))  # one process: the sums as they are
    return total / count
