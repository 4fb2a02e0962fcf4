"""training.step: one optimizer step over its micro-batches counts every token and equals one big batch."""

import pytest
import torch
from helpers import run_dir, tiny_recipe

from lean_relora.training.loop import setup
from lean_relora.training.step import train_step


def test_tokens_are_counted_exactly(tmp_path, tokenizer_cache):
    run = setup(tiny_recipe(grad_accum_steps=3), run_dir(tmp_path, tokenizer_cache))
    for _ in range(2):
        train_step(run)
    assert run.state.tokens == 2 * 3 * 8 * 32
    assert run.state.micro_batches == 6


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tokenizer_cache):
    """Two micro-batches of 4 give the same update as one batch of 8 holding the same sequences."""
    directory = run_dir(tmp_path, tokenizer_cache)
    big = setup(tiny_recipe(quant="none", micro_batch_size=8), directory)
    small = setup(tiny_recipe(quant="none", micro_batch_size=4, grad_accum_steps=2), directory)
    for run in (big, small):
        run.recipe.optim.grad_clip = 0.0
        for group in run.optimizer.param_groups:
            group["lr"] = 1e-3
    loss_big, loss_small = train_step(big), train_step(small)
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
