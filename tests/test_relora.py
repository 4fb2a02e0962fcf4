import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from lean_relora.quant import FrozenBase
from lean_relora.recipe import LoraConfig, RecipeError
from lean_relora.relora import ReLoRALinear, lora_parameters, merge_all, relora_layers, set_trainable, wrap_model
from test_quant import QUANTS, TOLERANCE, weight


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
    with pytest.raises(RecipeError, match="no nn.Linear in the model matches"):
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


def test_merge_all_touches_layers_one_at_a_time(tiny_llama):
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
    merge_all(model)
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
