"""The chunked loss: equal to Hugging Face's loss and gradients for every kind of causal LM, as accurate as HF's under
bf16 autocast, and never holding more than one chunk's logits."""

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
)

from lean_relora.memory.trace import LiveBytes
from lean_relora.model.loss import causal_lm_loss, linear_cross_entropy, output_head
from lean_relora.recipe import RecipeError

VOCAB = 101
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZES),
    "llama tied": lambda: LlamaConfig(**SIZES, tie_word_embeddings=True),
    "qwen2 (qkv bias)": lambda: Qwen2Config(**SIZES),
    "mistral": lambda: MistralConfig(**SIZES),
    "gemma2 (logit softcap)": lambda: Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=3.0),
    "cohere (logit scale)": lambda: CohereConfig(**SIZES, logit_scale=0.25),
    "granite (logits scaling)": lambda: GraniteConfig(**SIZES, logits_scaling=4.0),
    "phi3": lambda: Phi3Config(**SIZES, pad_token_id=0),
    "phi (lm_head bias)": lambda: PhiConfig(**SIZES),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, so both losses see the same network
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        nn.init.normal_(model.get_output_embeddings().bias)  # HF initializes it to zero: a wrong gradient would hide
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 4:9] = -100  # ignored targets
    labels[2, 0] = -100  # an ignored first position, which predicts nothing anyway
    return ids, labels


def loss_and_grads(model: nn.Module, chunk_tokens: int, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(model, ids, chunk_tokens, labels)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_every_gradient_equal_hugging_faces_in_fp32(name):
    model = build(name)
    reference, reference_grads = loss_and_grads(model, 0)
    for chunk_tokens in (1, 7, 39, 4096):  # one token, chunks not dividing the 39 tokens, exactly one, more than all
        loss, grads = loss_and_grads(model, chunk_tokens)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
        assert grads.keys() == reference_grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[key], rtol=1e-5, atol=1e-6 * grad.abs().max().item(),
                                       msg=f"{name}, chunk {chunk_tokens}: gradient of {key}")


@pytest.mark.parametrize("name", ["llama", "llama tied", "gemma2 (logit softcap)", "phi (lm_head bias)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_it_is_as_accurate_as_hugging_faces_loss(name, dtype):
    # As train runs it: bf16 autocast over fp32 or bf16 weights. The fp32 loss is the truth both are measured against.
    model = build(name)
    truth, truth_grads = loss_and_grads(model, 0)
    model.to(dtype)
    hf, hf_grads = loss_and_grads(model, 0, autocast=True)
    for chunk_tokens in (5, 4096):
        loss, grads = loss_and_grads(model, chunk_tokens, autocast=True)
        assert abs(loss - truth) <= 1.5 * abs(hf - truth) + 1e-6 * truth
        for key, grad in grads.items():
            error, hf_error = (grad - truth_grads[key]).norm(), (hf_grads[key] - truth_grads[key]).norm()
            assert error <= 1.5 * hf_error + 1e-3 * truth_grads[key].norm(), f"{name}, chunk {chunk_tokens}: {key}"


def test_a_frozen_output_layer_gets_no_gradient_and_the_rest_the_same():
    model = build("llama")
    model.lm_head.weight.requires_grad_(False)
    _, reference = loss_and_grads(model, 0)
    _, grads = loss_and_grads(model, 4)
    assert "lm_head.weight" not in grads and grads.keys() == reference.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_tokens", [64, 256])
def test_it_holds_one_chunks_logits_not_all_of_them(chunk_tokens):
    tokens, vocab, width = 2048, 3000, 16
    hidden = torch.randn(1, tokens, width, requires_grad=True)
    head = nn.Linear(width, vocab, bias=False)
    labels = torch.randint(0, vocab, (1, tokens))
    tracker = LiveBytes(hidden, head.weight, labels)
    with tracker:
        linear_cross_entropy(hidden, head, labels, chunk_tokens).backward()
    chunk_logits = chunk_tokens * vocab * 4  # one chunk's fp32 logits
    inputs_and_grads = 2 * (hidden.numel() + head.weight.numel()) * 4 + 8 * tokens * 8  # and per-token scalars
    assert tracker.peak <= inputs_and_grads + 3 * chunk_logits
    assert tracker.peak < tokens * vocab * 4 / 3  # a third of one fp32 copy of all the logits


def test_an_output_layer_it_cannot_compute_through_is_refused_in_one_line():
    model = build("llama")
    model.lm_head = nn.Sequential(model.lm_head)
    refused = r"^train.loss_chunk_tokens: the model.s output layer is a Sequential.*= 0 for"
    with pytest.raises(RecipeError, match=refused) as e:
        output_head(model)
    assert "\n" not in str(e.value)
