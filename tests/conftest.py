import pytest
import torch

from lean_relora.model.build import build_model
from lean_relora.recipe import ModelConfig


@pytest.fixture
def tiny_llama():
    """A two-layer LLaMA small enough to train in a second on a CPU; built in code, no download."""

    def make(vocab_size: int = 128, seed: int = 0, dtype: str = "fp32"):
        torch.manual_seed(seed)
        cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          max_position_embeddings=64, dtype=dtype)
        return build_model(cfg, vocab_size=vocab_size, seq_len=32)

    return make
