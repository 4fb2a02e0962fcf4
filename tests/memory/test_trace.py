"""trace: the fake-tensor step's peak against torch's own MemTracker on the same step run for real."""

import pytest
import torch
from helpers import SMALL_RECIPES, SMALL_VOCAB, small
from torch.distributed._tools.mem_tracker import MemTracker

from lean_relora.memory.trace import build_for_phase, model_tensors, run_step, trace
from lean_relora.recipe import Recipe
from lean_relora.training.distributed import SOLO
from lean_relora.training.restart import merge_cycle


def measured_peak(recipe: Recipe, phase: str = "relora") -> int:
    """Peak live tensor bytes of a real steady-state CPU training step, by torch's own MemTracker."""
    torch.manual_seed(0)
    model, optimizer = build_for_phase(recipe, SMALL_VOCAB, phase)
    merge_cycle(model, SOLO)  # the steady state of a run is after a restart, as the trace takes it
    ids = torch.randint(0, SMALL_VOCAB, (recipe.train.micro_batch_size, recipe.data.seq_len))
    # the first step creates the optimizer state
    run_step(model, optimizer, [ids], autocast=False, loss_chunk_tokens=recipe.train.loss_chunk_tokens)
    if recipe.train.grad_accum_steps > 1:  # later micro-batches of a step find the gradients there
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    tracker = MemTracker()
    tracker.track_external(model, optimizer, *model_tensors(model), ids)
    with tracker:
        run_step(model, optimizer, [ids], autocast=False, loss_chunk_tokens=recipe.train.loss_chunk_tokens)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]




@pytest.mark.parametrize("name", SMALL_RECIPES)
def test_traced_estimate_is_within_5_percent_of_the_measured_peak(name):
    recipe = SMALL_RECIPES[name]
    measured = measured_peak(recipe)
    assert trace(recipe, SMALL_VOCAB).peak == pytest.approx(measured, rel=0.05)


def test_full_rank_phase_is_estimated_too():
    recipe = small()
    assert trace(recipe, SMALL_VOCAB, "full").peak == pytest.approx(measured_peak(recipe, "full"), rel=0.05)
