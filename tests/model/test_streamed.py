"""load: a pretrained model read tensor by tensor into a meta-built model equals from_pretrained, target by target."""

import pytest
import torch
from helpers import tiny_model
from transformers import AutoModelForCausalLM

from lean_relora.model.build import build_model
from lean_relora.model.relora import relora_layers, wrap_model
from lean_relora.model.streamed import empty_pretrained, fill_remaining, streamable
from lean_relora.recipe import LoraConfig, RecipeError

LORA = LoraConfig(rank=4, quant="nf4")


def saved_llama(directory, tie: bool, shard: str):
    torch.manual_seed(0)
    cfg = tiny_model(tie_embeddings=tie)
    build_model(cfg, vocab_size=96, seq_len=32).save_pretrained(directory, max_shard_size=shard)
    return directory


@pytest.mark.parametrize("tie,shard", [(False, "100KB"), (True, "10GB")], ids=["sharded", "tied single file"])
def test_streamed_model_equals_from_pretrained_then_wrapped(tmp_path, tie, shard):
    directory = saved_llama(tmp_path, tie, shard)
    assert streamable(str(directory))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    wrap_model(reference, LORA, keep_master=True, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    model, source = empty_pretrained(directory, torch.float32)
    wrap_model(model, LORA, keep_master=True, dtype=torch.float32, generator=torch.Generator().manual_seed(1),
               materialize=lambda name, linear: source.fill(name, linear, "cpu", torch.float32))
    fill_remaining(model, source, "cpu", torch.float32)
    assert not any(p.device.type == "meta" for p in model.parameters())
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for mine, theirs in zip(relora_layers(model), relora_layers(reference)):
        assert torch.equal(mine.base.master.read(), theirs.base.master.read())
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    ids = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_a_checkpoint_missing_a_tensor_names_it(tmp_path):
    directory = saved_llama(tmp_path, tie=False, shard="10GB")
    model, source = empty_pretrained(directory, torch.float32)
    del source.files["model.norm.weight"]
    with pytest.raises(RecipeError, match="its safetensors files lack model.norm.weight, which the model's config "
                                          "needs; re-save the model with transformers"):
        fill_remaining(model, source, "cpu", torch.float32)
