"""Gradient init (relora.init = "gradient"): the range finder finds a planted gradient's subspace; a restart with it
keeps the function; a run with it resumes bit for bit."""

import copy

import pytest
import torch
from helpers import records, run_dir, tiny_recipe

from lean_relora.model.build import enable_checkpointing
from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.gradinit import KAIMING_ROW_NORM, init_from_gradient
from lean_relora.model.relora import ReLoRALinear, relora_layers, wrap_model
from lean_relora.recipe import LoraConfig, RecipeError, ReloraConfig
from lean_relora.training.loop import setup, train
from lean_relora.training.restart import restart
from lean_relora.training.step import train_step


def principal_cosines(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(rows^T) and span(basis) (both of R^in)."""
    q = torch.linalg.qr(rows.t()).Q
    return torch.linalg.svdvals(q.t() @ basis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the sketch products run in it
def test_the_range_finder_finds_the_top_right_singular_subspace_of_a_planted_gradient(dtype):
    # G = M exactly: one-hot inputs x_t = e_t and output gradients g_t = M[:, t] (loss = sum_t y_t . M[:, t]).
    # M = U diag(s) V^T has 4 strong directions, then two decades lower a tail: A must span V's first 4
    # (without a power iteration the range finder's error grows with the tail: a decade lower gives up to 9 degrees).
    out_features, in_features, rank = 48, 96, 4
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(out_features, out_features, generator=g)).Q
    v = torch.linalg.qr(torch.randn(in_features, in_features, generator=g)).Q
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), 0.05 * torch.rand(out_features - rank, generator=g)])
    m = u @ torch.diag(s) @ v[:, :out_features].t()
    layer = ReLoRALinear(FrozenBase(torch.randn(out_features, in_features, generator=g), None, "none",
                                    dtype=dtype), rank=rank, alpha=8, dtype=dtype, generator=g)
    tokens, m = torch.eye(in_features, dtype=dtype), m.to(dtype)
    batches = [torch.arange(0, 50), torch.arange(50, in_features)]  # two micro-batches: the sketches accumulate
    loss_of = lambda index: (layer(tokens[index]) * m.t()[index]).sum()
    init_from_gradient(layer, batches, loss_of, torch.Generator().manual_seed(0))

    a = layer.lora_A.detach().float()
    angles = torch.rad2deg(torch.arccos(principal_cosines(a, v[:, :rank]).clamp(max=1)))
    assert angles.max() < 2.0, angles  # a random A's angles to V are near 90 degrees
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    # orthogonal rows, Kaiming norm
    torch.testing.assert_close(a @ a.t(), KAIMING_ROW_NORM ** 2 * torch.eye(rank), **tolerance)
    # Kaiming-uniform's expected squared Frobenius norm, r * in * variance 1 / (3 in), is what the rows keep.
    assert a.pow(2).sum().item() == pytest.approx(rank / 3, rel=tolerance["rtol"])
    assert torch.all(layer.lora_B == 0) and layer.lora_A.grad is None and layer.lora_A.requires_grad


def test_gradient_checkpointing_finds_the_same_factors(tiny_llama):
    # The probe keeps each layer's input with save_for_backward, so checkpointing recomputes it: same sketches.
    model = tiny_llama()
    wrap_model(model, LoraConfig(rank=4, quant="none"), keep_master=False, dtype=torch.float32,
               generator=torch.Generator().manual_seed(0))
    checkpointed = copy.deepcopy(model)
    enable_checkpointing(checkpointed)
    ids = torch.randint(0, 128, (2, 3, 16), generator=torch.Generator().manual_seed(2))
    for net in (model, checkpointed):
        net.train()
        init_from_gradient(net, list(ids), lambda batch, net=net: net(input_ids=batch, labels=batch).loss,
                           torch.Generator().manual_seed(0))
    for plain, recomputed in zip(relora_layers(model), relora_layers(checkpointed)):
        torch.testing.assert_close(plain.lora_A, recomputed.lora_A, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the passes leave no gradient behind


def test_a_restart_with_gradient_init_keeps_the_function_and_counts_its_tokens(tmp_path, tokenizer_cache):
    recipe = tiny_recipe(quant="none", steps=10, restart_every=4)
    recipe.relora.init, recipe.relora.init_batches = "gradient", 3
    run = setup(recipe, run_dir(tmp_path, tokenizer_cache))
    for _ in range(4):
        train_step(run)
    ids = next(iter(run.data.eval_batches(4, 1)))
    run.model.eval()
    with torch.no_grad():
        before = run.model(input_ids=ids).logits
    old_a = [layer.lora_A.detach().clone() for layer in relora_layers(run.model)]
    tokens, micro_batches = run.state.tokens, run.state.micro_batches
    record = restart(run)
    run.model.eval()
    with torch.no_grad():
        after = run.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert run.state.micro_batches == micro_batches + 3  # the next micro-batches of the data order
    assert run.state.tokens - tokens == record["init_tokens"] == 2 * 3 * 8 * 32  # two passes over each
    assert record["init_seconds"] > 0 and record["merge_seconds"] > 0
    for layer, old in zip(relora_layers(run.model), old_a):
        a = layer.lora_A.detach()
        assert torch.all(layer.lora_B == 0)
        torch.testing.assert_close(a @ a.t(), KAIMING_ROW_NORM ** 2 * torch.eye(layer.rank), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(a, old)
    assert all(p.grad is None for p in run.model.parameters())


def test_a_run_with_gradient_init_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, tokenizer_cache):
    # Stops at the warm start's end (step 5: ReLoRA and its first gradient init come after the checkpoint) and at a
    # restart (step 12): the resumed run redoes the init on the same micro-batches with the same random state.
    recipe = tiny_recipe(steps=16, warm_start=5, restart_every=7)
    recipe.relora.init, recipe.relora.init_batches = "gradient", 2
    (tmp_path / "whole").mkdir(), (tmp_path / "pieces").mkdir()
    whole = run_dir(tmp_path / "whole", tokenizer_cache)
    summary = train(recipe, whole)
    pieces = run_dir(tmp_path / "pieces", tokenizer_cache)
    train(recipe, pieces, stop_at=5)
    train(recipe, pieces, resume="auto", stop_at=12)
    resumed = train(recipe, pieces, resume="auto")
    steps = lambda d: [(r["step"], r["loss"], r["tokens"]) for r in records(d / "metrics.jsonl") if "loss" in r]
    assert steps(pieces) == steps(whole)
    assert resumed.last_eval_loss == summary.last_eval_loss
    # 16 steps of 8 x 32 tokens, and two inits (after the warm start, at the restart) of 2 micro-batches passed twice
    assert summary.tokens == 16 * 256 + 2 * 2 * 2 * 256
    inits = [r for r in records(whole / "metrics.jsonl") if "init_tokens" in r]
    assert [r["step"] for r in inits] == [12] and inits[0]["init_tokens"] == 2 * 2 * 256


def test_a_recipe_refuses_an_unknown_init_and_no_init_batches():
    with pytest.raises(RecipeError, match="init = 'svd'"):
        ReloraConfig(init="svd")
    with pytest.raises(RecipeError, match="init_batches = 0"):
        ReloraConfig(init_batches=0)
