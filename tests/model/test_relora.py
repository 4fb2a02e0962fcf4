import pytest
import torch
from helpers import QUANTS, TOLERANCE, weight
from tiny_models import CONFIGS, VOCAB
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.relora import (
    FROZEN_WARNING,
    ReLoRALinear,
    decoder_blocks,
    lora_parameters,
    relora_layers,
    set_trainable,
    target_modules,
    target_summary,
    wrap_model,
)
from lean_relora.recipe import LoraConfig, RecipeError
from lean_relora.tools.export import merged_layer
from lean_relora.training.distributed import SOLO
from lean_relora.training.restart import merge_cycle


def trained_layer(quant, keep_master=False, seed=0, shape=(64, 128)):
    """A ReLoRA layer whose B is non-zero, as after some training."""
    g = torch.Generator().manual_seed(seed)
    layer = ReLoRALinear(FrozenBase(weight(*shape), None, quant, keep_master=keep_master, dtype=torch.float32),
                         rank=4, alpha=8, dtype=torch.float32, generator=g)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return layer


@pytest.mark.parametrize("quant", QUANTS)
def test_forward_equals_base_plus_scaled_low_rank_update(quant):
    layer = trained_layer(quant)
    x = torch.randn(6, 128)
    w = layer.base.dequantize()
    expected = x @ (w + layer.scale * layer.lora_B @ layer.lora_A).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("quant", QUANTS)
def test_with_a_bias_and_batched_inputs_forward_and_gradients_follow_the_dense_formula(quant):
    # The LoRA product is added into the base's output in place where autograd allows it; with a bias, bnb's 4-bit
    # matmul and the int8 layer return a view, where it does not (GPT-2's projections all have one).
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(64, generator=g)
    layer = ReLoRALinear(FrozenBase(weight(), bias, quant, dtype=torch.float32), rank=4, alpha=8,
                         dtype=torch.float32, generator=g)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    x = torch.randn(2, 3, 128, generator=g, requires_grad=True)
    dense = (layer.base.dequantize() + layer.scale * layer.lora_B @ layer.lora_A).detach()
    y = layer(x)
    torch.testing.assert_close(y, x @ dense.t() + layer.base.bias.float(), rtol=1e-3, atol=1e-4)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * y.detach() @ dense, rtol=1e-3, atol=1e-4)
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("quant", QUANTS)
def test_fresh_layer_computes_the_base_alone_and_both_factors_get_gradients(quant):
    layer = ReLoRALinear(FrozenBase(weight(), None, quant, dtype=torch.float32), rank=4, alpha=8,
                         dtype=torch.float32)
    x = torch.randn(6, 128)
    torch.testing.assert_close(layer(x), layer.base(x))
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    layer(x).pow(2).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0  # A != 0 lets the gradient reach B on the first step


@pytest.mark.parametrize("quant", QUANTS)
def test_merge_moves_the_update_into_the_base_and_restarts_the_factors(quant):
    layer = trained_layer(quant)
    x = torch.randn(6, 128)
    dense_reference = layer.base.dequantize() + layer.scale * (layer.lora_B @ layer.lora_A).detach()
    before = layer(x).detach()
    old_A = layer.lora_A.detach().clone()

    layer.merge_and_reinit(torch.Generator().manual_seed(1))

    assert torch.all(layer.lora_B == 0)
    assert not torch.equal(layer.lora_A, old_A) and layer.lora_A.abs().sum() > 0
    # The base now computes W + sBA (up to one requantization), so the forward is unchanged...
    after = layer(x).detach()
    reference = x @ dense_reference.t()
    assert (after - reference).abs().max() <= TOLERANCE[quant] * reference.abs().max()
    # ...and it really is the base that changed: its output moved by the merged update.
    base_only = layer.base(x).detach()
    assert (base_only - before).abs().max() <= TOLERANCE[quant] * before.abs().max()
    if quant == "none":
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_merge_with_master_keeps_updates_smaller_than_the_quantization_step():
    layer = trained_layer("nf4", keep_master=True)
    w0 = layer.base.master.read().clone()
    with torch.no_grad():
        layer.lora_B.mul_(1e-3)  # an update far below the nf4 step of this weight
    delta = layer.scale * (layer.lora_B @ layer.lora_A).detach()
    layer.merge_and_reinit()
    torch.testing.assert_close(layer.base.master.read(), w0 + delta)


def test_wrap_model_replaces_exactly_the_targets(tiny_llama):
    model = tiny_llama()
    names = wrap_model(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"]), keep_master=False,
                       dtype=torch.float32)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert len(relora_layers(model)) == 4
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)


def test_wrap_model_rejects_targets_that_match_nothing(tiny_llama):
    with pytest.raises(RecipeError, match="no nn.Linear or Conv1D inside the decoder blocks matches"):
        wrap_model(tiny_llama(), LoraConfig(targets=["nothing_here"]), keep_master=False, dtype=torch.float32)


@pytest.mark.parametrize("freeze", [False, True])
def test_trainable_set_is_lora_plus_full_rank_embeddings_norms_head(tiny_llama, freeze):
    model = tiny_llama()
    cfg = LoraConfig(rank=4, quant="nf4", train_embeddings=not freeze, train_norms=not freeze,
                     train_lm_head=not freeze)
    wrap_model(model, cfg, keep_master=False, dtype=torch.float32)
    set_trainable(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert {id(p) for p in model.parameters() if p.requires_grad} >= {id(p) for p in lora_parameters(model)}
    assert len(lora) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    full_rank = trainable - lora
    if freeze:
        assert full_rank == set()
    else:
        assert "model.embed_tokens.weight" in full_rank and "lm_head.weight" in full_rank
        assert "model.norm.weight" in full_rank and "model.layers.0.input_layernorm.weight" in full_rank
        assert all("embed" in n or "norm" in n or "lm_head" in n for n in full_rank)


def test_a_restart_merges_the_layers_one_at_a_time(tiny_llama):
    model = tiny_llama()
    wrap_model(model, LoraConfig(rank=4, quant="nf4"), keep_master=True, dtype=torch.float32)
    events, layers = [], relora_layers(model)
    for i, layer in enumerate(layers):
        original = layer.base.load_dense

        def record(dense, i=i, original=original):
            events.append(("start", i))
            original(dense)
            events.append(("end", i))

        layer.base.load_dense = record
    merge_cycle(model, SOLO)
    assert events == [(kind, i) for i in range(len(layers)) for kind in ("start", "end")]


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
@pytest.mark.parametrize("keep_master", [False, True])
def test_merge_transient_is_about_one_dense_fp32_copy_of_the_layer(quant, keep_master):
    layer = trained_layer(quant, keep_master, shape=(1024, 512))
    dense_fp32 = 1024 * 512 * 4
    tracker = MemTracker()  # torch's TorchDispatchMode-based tracker of live tensor bytes
    tracker.track_external(layer, *layer.base.held_tensors())
    with tracker:
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        layer.merge_and_reinit()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    # Beside the dense copy, the new stored form exists before the old one is dropped: 4-bit ~1/8 of the fp32 size,
    # int8 1/4 plus a 256-row slice converted to fp16, none a whole copy.
    new_storage = {"nf4": 0.14, "int8": 0.45, "none": 1.0}[quant]
    assert peak - before <= (1.0 + new_storage + 0.05) * dense_fp32


def tiny(arch):
    return AutoModelForCausalLM.from_config(CONFIGS[arch](VOCAB, 0))


@pytest.mark.parametrize("arch", CONFIGS)
def test_default_targets_are_every_projection_of_the_decoder_blocks_and_nothing_else(arch):
    model = tiny(arch)
    selected = dict(target_modules(model, []))
    prefix, blocks = decoder_blocks(model)
    assert blocks is model.get_submodule(prefix) and len(blocks) == 2
    assert all(n.startswith(prefix + ".") for n in selected) and not any("lm_head" in n for n in selected)
    # Every parameter of a block is a selected weight, a selected layer's bias or a norm's: none is left over.
    accounted = {id(p) for m in selected.values() for p in m.parameters()}
    accounted |= {id(p) for m in blocks.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
    assert {id(p) for p in blocks.parameters()} == accounted
    fused = {"phi3": {"qkv_proj", "gate_up_proj"}, "gpt2": {"c_attn", "c_fc"}}.get(arch, set())
    assert fused <= {n.rsplit(".", 1)[-1] for n in selected}
    line, warning = target_summary(model, [])
    assert line.startswith(f"ReLoRA layers: {len(selected)} (all block projections") and "100%" in line
    assert warning is None


@pytest.mark.parametrize("arch", CONFIGS)
def test_with_default_settings_every_parameter_trains(arch):
    # Projections become LoRA factors over frozen buffers; embeddings (GPT-2's positions too), norms (GPT-2's
    # LayerNorm ln_1 too) and lm_head train full-rank: nothing is frozen without the recipe saying so.
    model, cfg = tiny(arch), LoraConfig(rank=4, quant="none")
    wrap_model(model, cfg, keep_master=False, dtype=torch.float32)
    set_trainable(model, cfg)
    assert all(p.requires_grad for p in model.parameters())


def test_target_summary_warns_when_the_targets_leave_much_of_the_blocks_frozen(tiny_llama):
    model = tiny_llama()
    line, warning = target_summary(model, ["q_proj", "v_proj"])
    # Per block: q and v are 2 x 64 x 64 of 4 x 64 x 64 (attention) + 3 x 128 x 64 (MLP) weights, 20%.
    assert line == ("ReLoRA layers: 4 (lora.targets = ['q_proj', 'v_proj']: q_proj, v_proj), 20% of the decoder "
                    "blocks' weight matrices")
    assert warning.startswith("lora.targets = ['q_proj', 'v_proj'] leaves 80% of the decoder blocks' weight "
                              f"matrices frozen (they never train; more than {FROZEN_WARNING:.0%})")
    assert target_summary(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])[1] is not None
    assert target_summary(model, [".*_proj"])[1] is None


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_a_wrapped_conv1d_computes_the_same_function_and_exports_in_its_own_layout(quant):
    model = tiny("gpt2").eval()
    conv = model.transformer.h[0].attn.c_attn
    original = conv.weight.detach().clone()
    x = torch.randn(3, 32)
    expected = conv(x).detach()
    wrap_model(model, LoraConfig(rank=4, quant=quant), keep_master=True, dtype=torch.float32)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, ReLoRALinear) and layer.transposed
    if quant == "none":
        torch.testing.assert_close(layer(x), expected)
    else:  # the base computes with its stored weight, which is the Conv1D's transposed, up to nf4 rounding
        stored = layer.base.dequantize()
        torch.testing.assert_close(layer(x), x @ stored.t() + conv.bias.detach(), rtol=1e-4, atol=1e-5)
        assert (stored - original.t()).norm() <= 0.25 * original.norm()  # a wrong layout would be off by ~140%
    torch.testing.assert_close(merged_layer(layer).weight, original)  # from the fp32 master, back in (in, out)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    merged = merged_layer(layer)
    assert isinstance(merged, Conv1D) and merged.weight.shape == original.shape
    update = layer.scale * (layer.lora_B @ layer.lora_A).detach()
    torch.testing.assert_close(merged(x), x @ (original + update.t()) + conv.bias.detach())
