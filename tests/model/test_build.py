"""model.build: a pretrained model's config read alone (no weights), its sizes, and the model built from it."""

from functools import partial
from pathlib import Path

import pytest
from tiny_models import CONFIGS, save_tiny_model
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lean_relora.model.build import build_model, enable_checkpointing, pretrained_config, sizes
from lean_relora.recipe import ModelConfig, RecipeError


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_pretrained_architecture_is_built_from_its_config_alone(tmp_path, arch):
    model_dir = save_tiny_model(arch, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    cfg = ModelConfig(pretrained=str(model_dir), dtype="fp32")
    built = build_model(cfg, 0, 16, config=pretrained_config(str(model_dir)))
    assert type(built) is type(loaded)
    assert {n: p.shape for n, p in built.state_dict().items()} == {n: p.shape for n, p in loaded.state_dict().items()}
    size = sizes(loaded.config)
    assert size == {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64 if arch != "gpt2"
                    else 4 * 32, "num_kv_heads": 2 if arch != "gpt2" else 4,
                    "tie_embeddings": loaded.config.tie_word_embeddings, "vocab_size": loaded.config.vocab_size}
    ModelConfig(**size)  # valid sizes for the memory model


def test_a_directory_without_a_model_is_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        pretrained_config(str(tmp_path))
    assert str(err.value).startswith(f"model.pretrained = '{tmp_path}': its config cannot be read (")
    assert "\n" not in str(err.value)


class Transformers517Llama(LlamaForCausalLM):
    """A LLaMA as transformers 5.17 (the GPU machine's) has it: no `activation_checkpointing_enable`."""

    @property
    def activation_checkpointing_enable(self):
        raise AttributeError("activation_checkpointing_enable")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.enabled_with = gradient_checkpointing_kwargs
        self._set_gradient_checkpointing(True, partial(checkpoint, **gradient_checkpointing_kwargs))


@pytest.mark.parametrize("cls", [LlamaForCausalLM, Transformers517Llama])
def test_checkpointing_is_enabled_by_either_name_transformers_has(cls):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)
    model = cls(config)
    enable_checkpointing(model)
    assert getattr(model, "enabled_with", {"use_reentrant": False}) == {"use_reentrant": False}
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_no_test_or_module_calls_the_newer_checkpointing_name_directly():
    # transformers 5.17 lacks it: every caller goes through model.enable_checkpointing (the GPU machine's version)
    root = Path(__file__).resolve().parents[2]
    callers = [path.relative_to(root).as_posix() for folder in ("lean_relora", "tests", "bench")
               for path in (root / folder).rglob("*.py") if ".activation_checkpointing_enable(" in path.read_text()
               and path.name != "test_build.py"]
    assert callers == []
