"""trace: the fake-tensor step's peak against torch's own MemTracker on the same step run for real."""

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from lean_relora.memory.trace import build_for_phase, model_tensors, run_step, trace
from lean_relora.recipe import DataConfig, LoraConfig, ModelConfig, OptimConfig, Recipe, ReloraConfig, TrainConfig
from lean_relora.training.distributed import SOLO
from lean_relora.training.restart import merge_cycle

VOCAB = 512


def small(quant="nf4", rank=8, checkpointing=False, dtype="fp32", accum=1, micro_batch=4, warm_start=0,
          loss_chunk=1024, frozen_embeddings=False):
    return Recipe(
        model=ModelConfig(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, dtype=dtype,
                          gradient_checkpointing=checkpointing, max_position_embeddings=128, vocab_size=VOCAB),
        data=DataConfig(seq_len=64),
        lora=LoraConfig(rank=rank, quant=quant, train_embeddings=not frozen_embeddings,
                        train_lm_head=not frozen_embeddings),
        relora=ReloraConfig(warm_start_steps=warm_start),
        optim=OptimConfig(),
        train=TrainConfig(micro_batch_size=micro_batch, grad_accum_steps=accum, device="cpu", autocast="none",
                          loss_chunk_tokens=loss_chunk),
    )


def measured_peak(recipe: Recipe, phase: str = "relora") -> int:
    """Peak live tensor bytes of a real steady-state CPU training step, by torch's own MemTracker."""
    torch.manual_seed(0)
    model, optimizer = build_for_phase(recipe, VOCAB, phase)
    merge_cycle(model, SOLO)  # the steady state of a run is after a restart, as the trace takes it
    ids = torch.randint(0, VOCAB, (recipe.train.micro_batch_size, recipe.data.seq_len))
    run_step(model, optimizer, [ids], autocast=False, loss_chunk_tokens=recipe.train.loss_chunk_tokens)  # the first step creates the optimizer state
    if recipe.train.grad_accum_steps > 1:  # later micro-batches of a step find the gradients there
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    tracker = MemTracker()
    tracker.track_external(model, optimizer, *model_tensors(model), ids)
    with tracker:
        run_step(model, optimizer, [ids], autocast=False, loss_chunk_tokens=recipe.train.loss_chunk_tokens)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


CONFIGS = {
    "nf4 r8": small(),
    "int8 r16": small(quant="int8", rank=16),
    "fp4 r4 mb8": small(quant="fp4", rank=4, micro_batch=8),
    "none ckpt": small(quant="none", checkpointing=True),
    "nf4 ckpt accum": small(checkpointing=True, accum=2),
    "nf4 bf16": small(dtype="bf16"),
    "nf4 loss in chunks of 64": small(loss_chunk=64),
    "nf4 ckpt HF loss": small(checkpointing=True, loss_chunk=0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_traced_estimate_is_within_5_percent_of_the_measured_peak(name):
    recipe = CONFIGS[name]
    measured = measured_peak(recipe)
    assert trace(recipe, VOCAB).peak == pytest.approx(measured, rel=0.05)


def test_full_rank_phase_is_estimated_too():
    recipe = small()
    assert trace(recipe, VOCAB, "full").peak == pytest.approx(measured_peak(recipe, "full"), rel=0.05)
