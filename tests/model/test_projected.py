"""relora.cycle = "projected": A orthonormal and frozen, only B trains; a cycle is GaLore's update with a right
projection (Zhao et al., arXiv 2403.03507, Algorithm 2), written out here from the paper, not imported."""

import math

import pytest
import torch
from helpers import records, run_dir, tiny_recipe

from lean_relora.memory.analytic import analytic
from lean_relora.memory.trace import trace
from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.relora import ReLoRALinear, lora_parameters, orthonormal_rows, relora_layers
from lean_relora.recipe import RecipeError, ReloraConfig
from lean_relora.training.loop import setup, train
from lean_relora.training.optim import optimizer_params
from lean_relora.training.restart import restart
from lean_relora.training.step import train_step

OUT, IN, RANK, ALPHA = 24, 16, 4, 8.0  # s = alpha / r = 2: GaLore's scale
LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-8
STEPS = 5  # per cycle; two cycles with a subspace switch between them


def problem(seed: int = 0):
    """A fixed regression: W0 (out x in), inputs x and targets; loss = mean squared error of x W^T."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, generator=g) / math.sqrt(IN)
    xs = [torch.randn(32, IN, generator=g) for _ in range(2 * STEPS)]
    targets = [torch.randn(32, OUT, generator=g) for _ in range(2 * STEPS)]
    projections = [orthonormal_rows(torch.randn(RANK, IN, generator=g)) for _ in range(2)]  # P^T of each cycle
    return w0, xs, targets, projections


def galore_reference(w0, xs, targets, projections) -> torch.Tensor:
    """GaLore's rule, right projection, P (in x r) orthonormal columns, switched (moments kept, as GaLore keeps
    them) after STEPS steps:
        G_t = dL/dW,  R_t = G_t P,  M_t = b1 M + (1 - b1) R_t,  V_t = b2 V + (1 - b2) R_t^2,
        N_t = M^_t / (sqrt(V^_t) + eps'),  W_t = W_{t-1} - lr * alpha * N_t P^T   (^: bias-corrected).
    B's Adam sees s R_t instead of R_t; Adam is scale-invariant except for eps, so eps' = eps / s, alpha = s."""
    scale = ALPHA / RANK
    w = w0.clone().double()
    m = v = torch.zeros(OUT, RANK, dtype=torch.float64)
    for t in range(1, 2 * STEPS + 1):
        p = projections[(t - 1) // STEPS].t().double()  # in x r
        wt = w.clone().requires_grad_(True)
        loss = torch.nn.functional.mse_loss(xs[t - 1].double() @ wt.t(), targets[t - 1].double())
        (g,) = torch.autograd.grad(loss, wt)
        r = g @ p
        m = BETAS[0] * m + (1 - BETAS[0]) * r
        v = BETAS[1] * v + (1 - BETAS[1]) * r * r
        n = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS / scale)
        w = w - LR * scale * n @ p.t()
    return w.float()


def projected_cycles(w0, xs, targets, projections, train_a: bool = False) -> torch.Tensor:
    """Two cycles of the projected mode on one fp32 layer: torch AdamW on B (A frozen unless `train_a`), no weight
    decay; between them the restart's merge, the new A, and the optimizer state kept (relora.reset = "keep")."""
    layer = ReLoRALinear(FrozenBase(w0.clone(), None, "none", dtype=torch.float32), RANK, ALPHA,
                         dtype=torch.float32, projected=True)
    layer.lora_A.requires_grad_(train_a)
    params = [p for p in (layer.lora_A, layer.lora_B) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    for cycle, projection in enumerate(projections):
        if cycle:
            layer.merge()
            with torch.no_grad():
                layer.lora_B.zero_()
        with torch.no_grad():
            layer.lora_A.copy_(projection)
        for t in range(cycle * STEPS, (cycle + 1) * STEPS):
            loss = torch.nn.functional.mse_loss(layer(xs[t]), targets[t])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return dense(layer)


def dense(layer: ReLoRALinear) -> torch.Tensor:
    """The weight the layer's forward sees, W + s B A, read through the layer itself (identity input)."""
    with torch.no_grad():
        return layer(torch.eye(IN)).t().contiguous()


def test_a_projected_cycle_is_galores_update():
    w0, xs, targets, projections = problem()
    reference = galore_reference(w0, xs, targets, projections)
    assert (reference - w0).abs().max() > 1e-2  # the weights moved
    torch.testing.assert_close(projected_cycles(w0, xs, targets, projections), reference, rtol=0, atol=1e-5)


def test_the_equivalence_fails_when_a_trains():
    w0, xs, targets, projections = problem()
    reference = galore_reference(w0, xs, targets, projections)
    trained_a = projected_cycles(w0, xs, targets, projections, train_a=True)
    assert (trained_a - reference).abs().max() > 1e-3


def test_projected_layers_hold_a_frozen_orthonormal_and_the_optimizer_only_b(tmp_path, tokenizer_cache):
    recipe = tiny_recipe(quant="nf4", steps=10, restart_every=4)
    recipe.relora.cycle = "projected"
    run = setup(recipe, run_dir(tmp_path, tokenizer_cache))
    layers = relora_layers(run.model)
    held = {id(p) for p in optimizer_params(run.optimizer)}
    for layer in layers:
        assert layer.projected and not layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert id(layer.lora_A) not in held and id(layer.lora_B) in held
        a = layer.lora_A.detach()
        torch.testing.assert_close(a @ a.t(), torch.eye(layer.rank), rtol=1e-5, atol=1e-5)
    assert {id(p) for p in lora_parameters(run.model)} == {id(layer.lora_B) for layer in layers}
    for _ in range(4):
        train_step(run)
    assert all(layer.lora_A.grad is None for layer in layers)
    old = [layer.lora_A.detach().clone() for layer in layers]
    restart(run)
    for layer, a_old in zip(layers, old):
        a = layer.lora_A.detach()
        torch.testing.assert_close(a @ a.t(), torch.eye(layer.rank), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, a_old) and torch.all(layer.lora_B == 0)


def test_a_projected_gradient_cycle_takes_the_gradient_subspace_from_step_0_with_orthonormal_rows(
        tmp_path, tokenizer_cache):
    recipe = tiny_recipe(quant="nf4", steps=9, restart_every=4)
    recipe.relora.cycle, recipe.relora.init, recipe.relora.init_batches = "projected", "gradient", 2
    recipe.relora.reset = "keep"
    directory = run_dir(tmp_path, tokenizer_cache)
    summary = train(recipe, directory)
    # step 0 and the restarts at 4 and 8 each pass 2 micro-batches twice
    assert summary.tokens == 9 * 256 + 3 * 2 * 2 * 256
    assert summary.last_eval_loss < summary.first_eval_loss


def test_a_projected_run_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, tokenizer_cache):
    recipe = tiny_recipe(steps=14, warm_start=3, restart_every=5)
    recipe.relora.cycle, recipe.relora.init, recipe.relora.init_batches = "projected", "gradient", 2
    (tmp_path / "whole").mkdir(), (tmp_path / "pieces").mkdir()
    whole = run_dir(tmp_path / "whole", tokenizer_cache)
    summary = train(recipe, whole)
    pieces = run_dir(tmp_path / "pieces", tokenizer_cache)
    train(recipe, pieces, stop_at=6)
    resumed = train(recipe, pieces, resume="auto")
    def steps(d):
        return [(r["step"], r["loss"], r["tokens"]) for r in records(d / "metrics.jsonl") if "loss" in r]
    assert steps(pieces) == steps(whole)
    assert resumed.last_eval_loss == summary.last_eval_loss


def test_the_memory_estimate_counts_no_gradient_or_moments_for_a():
    lora, projected = tiny_recipe(), tiny_recipe()
    projected.relora.cycle = "projected"
    vocab = 512
    a, b = analytic(lora, vocab), analytic(projected, vocab)
    shapes_in = 2 * (4 * 64 + 2 * 64 + 128)  # per layer: q, k, v, o, gate, up take 64 inputs, down 128
    r = lora.lora.rank
    assert a["trainable weights"] - b["trainable weights"] == r * shapes_in * 4
    assert b["frozen projections (A)"] == r * shapes_in * 4
    assert a["optimizer state"] > b["optimizer state"]
    traced_lora, traced_projected = trace(lora, vocab), trace(projected, vocab)
    assert traced_projected.optimizer < traced_lora.optimizer
    assert traced_projected.peak < traced_lora.peak


def test_a_recipe_refuses_an_unknown_cycle():
    with pytest.raises(RecipeError, match="cycle = 'galore'"):
        ReloraConfig(cycle="galore")
    assert ReloraConfig(reset="keep").reset == "keep"


def test_the_keep_reset_leaves_the_moments_as_they_are():
    from lean_relora.training.optim import moments, reset_state
    p = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    optimizer.step()
    before = [m.clone() for m in moments(optimizer, p)]
    reset_state(optimizer, [p], "keep", 0.99)
    for old, new in zip(before, moments(optimizer, p)):
        assert torch.equal(old, new)
    reset_state(optimizer, [p], "magnitude", 0.99)
    assert (moments(optimizer, p)[1] == 0).float().mean() > 0.98
