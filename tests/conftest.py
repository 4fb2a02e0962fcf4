import pytest
import torch
from helpers import PRETRAINED_RECIPE, TINY, tiny_model, tiny_recipe

from lean_relora.model.build import build_model
from lean_relora.training.loop import setup


@pytest.fixture
def tiny_llama():
    """A two-layer LLaMA small enough to train in a second on a CPU; built in code, no download."""

    def make(vocab_size: int = 128, seed: int = 0, dtype: str = "fp32"):
        torch.manual_seed(seed)
        return build_model(tiny_model(dtype=dtype), vocab_size=vocab_size, seq_len=32)

    return make


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    """One trained BPE tokenizer shared by the runs of this module (each run would otherwise train its own)."""
    cache = tmp_path_factory.mktemp("cache")
    setup(tiny_recipe(), cache)
    return cache


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def recipe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; def f(x): return "
                                  f"x + {i}." for i in range(60)))
    path = tmp_path / "recipe.toml"
    path.write_text(PRETRAINED_RECIPE.replace("[data]\n", f"[data]\nsource = {str(corpus)!r}\n"))
    return path
