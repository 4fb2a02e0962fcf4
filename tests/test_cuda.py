"""The CUDA path: what a CPU cannot show. Run with `pytest -m cuda` on a machine with a GPU; skipped elsewhere.

bitsandbytes takes other code paths on CUDA than on a CPU: paged optimizer state (a CPU-device tensor over
cudaMallocManaged memory), CUDA quantization kernels, and torch's allocator counters for the memory estimate.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from helpers import cuda_recipe
from torch import nn

from lean_relora.memory.estimate import cublas_workspace_bytes
from lean_relora.memory.measure import measure, paged_bytes, relora_run
from lean_relora.memory.trace import trace
from lean_relora.model.frozen_base import FrozenBase
from lean_relora.recipe import (
    ModelConfig,
    Recipe,
)
from lean_relora.training.loop import train
from lean_relora.training.optim import load_optimizer_state, moments, optimizer_state, paged_bytes_held, reset_state

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (CPU-only machine)")]

PAGED_SHAPE = (512, 256)  # 131,072 elements: above bnb's 1e5-element paging threshold


def stepped_pair(steps: int = 3):
    """The same parameter and gradients under PagedAdamW8bit and AdamW8bit on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    init = torch.randn(PAGED_SHAPE, device="cuda", generator=g)
    paged, plain = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt_paged, opt_plain = bnb.optim.PagedAdamW8bit([paged], lr=1e-3), bnb.optim.AdamW8bit([plain], lr=1e-3)
    for _ in range(steps):
        grad = torch.randn(PAGED_SHAPE, device="cuda", generator=g)
        paged.grad, plain.grad = grad.clone(), grad.clone()
        opt_paged.step()
        opt_plain.step()
    torch.cuda.synchronize()
    return paged, opt_paged, plain, opt_plain


def test_paged_state_is_really_paged_and_resets_like_ordinary_state():
    paged, opt_paged, plain, opt_plain = stepped_pair()
    assert getattr(opt_paged.state[paged]["state1"], "is_paged", False)
    for opt, p in ((opt_paged, paged), (opt_plain, plain)):
        reset_state(opt, [p], "magnitude", 0.99)
    torch.cuda.synchronize()
    for got, want in zip(moments(opt_paged, paged), moments(opt_plain, plain)):
        assert torch.equal(got, want)
    assert_same_next_step((paged, opt_paged), (plain, opt_plain))


def test_paged_state_checkpoint_round_trip_stays_paged_and_steps_identically():
    paged, opt_paged, _, _ = stepped_pair()
    tensors, params = optimizer_state(opt_paged)
    twin = nn.Parameter(paged.detach().clone())
    restored = bnb.optim.PagedAdamW8bit([twin], lr=1e-3)
    load_optimizer_state(restored, tensors, params)
    assert getattr(restored.state[twin]["state1"], "is_paged", False)
    assert_same_next_step((paged, opt_paged), (twin, restored))


def assert_same_next_step(*pairs):
    """One more step of each (parameter, optimizer) on the same gradient leaves the parameters equal."""
    grad = torch.randn(PAGED_SHAPE, device="cuda")
    for p, optimizer in pairs:
        p.grad = grad.clone()
        optimizer.step()
    torch.cuda.synchronize()
    assert all(torch.equal(p, pairs[0][0]) for p, _ in pairs)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_frozen_base_forward_merge_and_requantize_on_cuda(quant):
    w = torch.randn(256, 512) * 0.02
    base = FrozenBase(w.cuda().bfloat16(), None, quant, keep_master=True, dtype=torch.bfloat16)
    assert base.master.read().device.type == "cpu" and not base.master.read().is_pinned()
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(base(x), x @ base.dequantize().bfloat16().t(), rtol=2e-2, atol=2e-2)
    cpu_twin = FrozenBase(w.bfloat16(), None, quant, dtype=torch.bfloat16)
    agree = (base.dequantize().cpu() == cpu_twin.dequantize()).float().mean()
    assert agree > 0.999  # the CUDA and CPU kernels store the same weight
    expected = base.master.read().clone()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        up, down = torch.randn(256, 4, generator=g) * 1e-3, torch.randn(4, 512, generator=g)
        base.add_low_rank_(up.cuda(), down.cuda(), 1.0)
        expected += up @ down
    torch.testing.assert_close(base.master.read(), expected, rtol=1e-5, atol=1e-6)
    if base.quant_state is not None:
        assert base.quant_state.dtype == torch.bfloat16
    kept, merged = base.probe.terms()
    assert kept / merged > 0.9


def test_int8_base_computes_the_same_function_in_train_and_eval_on_cuda():
    base = FrozenBase(torch.randn(256, 512, device="cuda") * 0.02, None, "int8", dtype=torch.bfloat16)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    x[:, :4] *= 100
    base.train()
    in_training = base(x)
    base.eval()
    assert torch.equal(base(x), in_training)




def test_stopped_and_resumed_run_on_cuda_repeats_the_uninterrupted_losses(tmp_path):
    def losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train(cuda_recipe(), tmp_path / "whole")
        train(cuda_recipe(), tmp_path / "pieces", stop_at=7)
        train(cuda_recipe(), tmp_path / "pieces", resume="auto")
    finally:
        torch.use_deterministic_algorithms(False)
    assert losses(tmp_path / "pieces") == losses(tmp_path / "whole")


def sized_recipe(quant: str) -> Recipe:
    """A ~150M-parameter model whose step peaks near 1 GiB: large enough that 10% is not the fixed overheads."""
    recipe = cuda_recipe()
    recipe.model = ModelConfig(hidden_size=1024, intermediate_size=2752, num_layers=8, num_heads=16, dtype="bf16",
                               max_position_embeddings=512)
    recipe.data.seq_len, recipe.train.micro_batch_size, recipe.train.grad_accum_steps = 512, 8, 2
    recipe.lora.quant, recipe.lora.rank = quant, 64
    return recipe


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_memory_estimate_is_within_10_percent_of_the_cuda_peak(quant):
    recipe, vocab = sized_recipe(quant), 8192
    measured = measure(recipe, vocab, "cuda", timed_steps=1)
    # torch counts the cuBLAS workspaces as allocated; the estimate adds them to the trace the same way
    predicted = trace(recipe, vocab).peak + cublas_workspace_bytes(torch.cuda.get_device_capability())
    assert measured.peak > 512 * 2**20
    assert measured.peak == pytest.approx(predicted, rel=0.10)


def test_the_cublas_workspaces_torch_holds_are_the_ones_the_estimate_counts():
    measured = measure(cuda_recipe(), 4096, "cuda", timed_steps=1)
    if measured.workspace_bytes is None:
        pytest.skip("this torch cannot free its cuBLAS workspaces, so they cannot be measured")
    assert measured.workspace_bytes == cublas_workspace_bytes(torch.cuda.get_device_capability())


def test_the_warm_starts_optimizer_state_is_gone_once_relora_begins(tmp_path):
    # bnb frees no paged buffer: the warm start's optimizer must not page, or its state would stay to the end
    recipe = cuda_recipe()
    recipe.optim.name = "paged_adamw8bit"
    recipe.model = ModelConfig(hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8, dtype="bf16",
                               max_position_embeddings=128)  # matrices above bnb's 1e5-element paging threshold
    held = paged_bytes_held()
    run = relora_run(recipe, 4096, torch.device("cuda"), warm_start=True)
    assert paged_bytes_held() - held == paged_bytes(run.optimizer) > 0


def test_the_launcher_of_several_ranks_opens_no_cuda_context(tmp_path):
    script = ("import sys, torch; from lean_relora.cli.app import _refuse_if_it_does_not_fit; "
              "from helpers import cuda_recipe; _refuse_if_it_does_not_fit(cuda_recipe(), None, nproc=2); "
              "print(torch.cuda.is_initialized())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent, env=os.environ | {"PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_offloaded_activations_go_to_pinned_host_memory_and_leave_the_gradients_unchanged():
    from helpers import checkpointed_llama, gradients

    from lean_relora.model.offload import OffloadSaved

    model = checkpointed_llama().cuda()
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    plain = gradients(model, ids)
    pinned = []
    hooks = OffloadSaved(min_bytes=2 * 32 * 64 * 4)
    pack = hooks.pack_hook

    def spy(tensor):
        packed = pack(tensor)
        if not isinstance(packed, torch.Tensor):
            pinned.append(packed[1].is_pinned() and packed[1].device.type == "cpu")
        return packed
    hooks.pack_hook = spy
    offloaded = gradients(model, ids, hooks)
    torch.cuda.synchronize()
    assert pinned and all(pinned)
    for a, b in zip(plain, offloaded):
        assert torch.equal(a, b)
