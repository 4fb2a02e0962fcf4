"""measure: the real step of the loop's own functions, against memory-estimate's trace of the same recipe."""

import pytest
import torch
from helpers import small_model

from lean_relora.memory.measure import RandomTokens, measure
from lean_relora.memory.trace import trace
from lean_relora.recipe import DataConfig, LoraConfig, OptimConfig, Recipe, ReloraConfig, TrainConfig

VOCAB = 512


def recipe(quant: str, checkpointing: bool = False) -> Recipe:
    return Recipe(
        model=small_model(gradient_checkpointing=checkpointing, vocab_size=VOCAB),
        data=DataConfig(seq_len=64),
        lora=LoraConfig(rank=8, quant=quant),
        relora=ReloraConfig(restart_every=5, restart_warmup_steps=1),
        optim=OptimConfig(),
        train=TrainConfig(micro_batch_size=4, device="cpu", autocast="none"),
    )


def test_random_tokens_are_reproducible_by_index_and_in_range():
    data = RandomTokens(VOCAB, 16, seed=3)
    assert torch.equal(data.train_batch(5, 2), data.train_batch(5, 2))
    assert not torch.equal(data.train_batch(5, 2), data.train_batch(6, 2))
    batch = data.train_batch(0, 4)
    assert batch.shape == (4, 16) and 0 <= batch.min() and batch.max() < VOCAB


@pytest.mark.parametrize("quant,checkpointing", [("nf4", False), ("int8", True)])
def test_measured_peak_of_the_training_step_matches_the_trace(quant, checkpointing):
    measured = measure(recipe(quant, checkpointing), VOCAB, "cpu", timed_steps=1)
    predicted = trace(recipe(quant, checkpointing), VOCAB).peak
    assert measured.peak == pytest.approx(predicted, rel=0.05)
    assert measured.peak_reserved is None and measured.paged_bytes == 0  # CPU: no allocator cache, nothing paged
    assert measured.merge_seconds > 0 and measured.step_seconds > 0 and measured.tokens_per_step == 4 * 64
