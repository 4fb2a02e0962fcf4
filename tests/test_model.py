"""lean_relora.model: a pretrained model's config read alone (no weights), its sizes, and the model built from it."""

import pytest
from transformers import AutoModelForCausalLM

from lean_relora.model import build_model, pretrained_config, sizes
from lean_relora.recipe import ModelConfig, RecipeError
from tiny_models import CONFIGS, save_tiny_model


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
