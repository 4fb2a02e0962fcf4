import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lean_relora.recipe import OptimConfig
from lean_relora.training.optim import (
    SlicedAdamW8bit,
    build_optimizer,
    load_optimizer_state,
    moments,
    optimizer_state,
    reset_state,
)

SHAPE = (64, 128)  # 8192 elements: above bnb's 4096-element threshold, so the state is really 8-bit


def stepped(optimizer_cls, steps=3, seed=0):
    """A parameter, its optimizer after a few steps, and torch's fp32 AdamW run on the same gradients."""
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(SHAPE, generator=g))
    ref = nn.Parameter(p.detach().clone())
    opt, ref_opt = optimizer_cls([p], lr=1e-3), torch.optim.AdamW([ref], lr=1e-3)
    for _ in range(steps):
        grad = torch.randn(SHAPE, generator=g)
        p.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    return p, opt, ref, ref_opt


@pytest.mark.parametrize("cls", [bnb.optim.PagedAdamW8bit, bnb.optim.AdamW8bit])
def test_8bit_moments_read_back_match_float_adam(cls):
    p, opt, ref, ref_opt = stepped(cls)
    assert opt.state[p]["state1"].dtype == torch.uint8
    for got, want in zip(moments(opt, p), moments(ref_opt, ref)):
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("cls", [bnb.optim.PagedAdamW8bit, bnb.optim.AdamW8bit, torch.optim.AdamW])
@pytest.mark.parametrize("ratio", [0.9, 0.99])
def test_magnitude_reset_matches_float_reference(cls, ratio):
    p, opt, _, _ = stepped(cls)
    m_ref, v_ref = moments(opt, p)  # the moments as values, before the reset
    reset_state(opt, [p], "magnitude", ratio)
    m, v = moments(opt, p)
    # The same pruning done in float: keep the (1 - ratio) largest |v|, and the largest |m| where v survives.
    k = int(v_ref.numel() * ratio)
    v_keep = v_ref.abs() > v_ref.abs().flatten().kthvalue(k).values
    m_keep = (m_ref.abs() > m_ref.abs().flatten().kthvalue(k).values) & v_keep
    assert torch.equal(v != 0, v_keep) and torch.equal(m != 0, m_keep)
    # surviving entries keep their value up to one 8-bit requantization (the dynamic map's step is <~3%)
    torch.testing.assert_close(v, v_ref * v_keep, rtol=0.03, atol=0.0)
    torch.testing.assert_close(m, m_ref * m_keep, rtol=0.03, atol=0.0)


@pytest.mark.parametrize("cls", [bnb.optim.AdamW8bit, torch.optim.AdamW])
def test_zero_reset_gives_exact_zero_moments_not_code_zero(cls):
    p, opt, _, _ = stepped(cls)
    reset_state(opt, [p], "zero", 0.0)
    m, v = moments(opt, p)
    assert torch.all(m == 0) and torch.all(v == 0)
    if cls is bnb.optim.AdamW8bit:  # the signed map's zero is a middle code; its code 0 means about -absmax
        assert torch.all(opt.state[p]["qmap1"][opt.state[p]["state1"].long()] == 0)


def test_random_reset_keeps_about_one_minus_ratio_and_only_the_listed_params():
    p, opt, _, _ = stepped(bnb.optim.AdamW8bit)
    other = nn.Parameter(torch.randn(SHAPE))
    opt.add_param_group({"params": [other]})
    other.grad = torch.randn(SHAPE)
    p.grad = torch.randn(SHAPE)
    opt.step()
    untouched = [t.clone() for t in moments(opt, other)]
    m_before, _ = moments(opt, p)
    reset_state(opt, [p], "random", 0.5, torch.Generator().manual_seed(0))
    m, v = moments(opt, p)
    assert 0.35 < v.count_nonzero() / v.numel() < 0.65
    kept = m != 0
    torch.testing.assert_close(m[kept], m_before[kept], rtol=0.05, atol=0.02 * m_before.abs().max().item())
    for before, after in zip(untouched, moments(opt, other)):
        assert torch.equal(before, after)


def test_small_tensors_keep_32bit_state_and_reset_too():
    p = nn.Parameter(torch.randn(16, 16))
    opt = bnb.optim.AdamW8bit([p])
    p.grad = torch.randn(16, 16)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.float32
    reset_state(opt, [p], "zero", 0.0)
    assert all(torch.all(t == 0) for t in moments(opt, p))


def test_after_reset_the_next_step_stays_small():
    p, opt, _, _ = stepped(bnb.optim.AdamW8bit, steps=5)
    reset_state(opt, [p], "magnitude", 0.99)
    before = p.detach().clone()
    p.grad = torch.randn(SHAPE)
    opt.step()
    # lr 1e-3: Adam moves each entry by at most about lr / (1 - beta1) even on a fresh moment
    assert (p.detach() - before).abs().max() < 0.02


@pytest.mark.parametrize("name,cls", [("paged_adamw8bit", SlicedAdamW8bit), ("adamw8bit", SlicedAdamW8bit),
                                      ("adamw", torch.optim.AdamW)])
def test_build_optimizer_decays_matrices_only(tiny_llama, name, cls):
    model = tiny_llama()
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1), torch.device("cpu"))
    assert type(opt) is cls  # on CPU: bnb cannot page without CUDA, and steps large tensors in slices
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("paged", [True, False])
def test_a_paged_recipe_pages_on_cuda_only_where_asked(tiny_llama, paged):
    # bnb never frees paged state, so an optimizer dropped mid-run (the warm start's) is built with paged=False.
    # Building touches no GPU: the state is allocated at the first step.
    opt = build_optimizer(tiny_llama(), OptimConfig(name="paged_adamw8bit"), torch.device("cuda"), paged=paged)
    assert type(opt) is (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)
    assert opt.is_paged is paged


@pytest.mark.parametrize("capturable", [False, True])
def test_restored_adamw_keeps_its_step_counter_where_torch_keeps_it(capturable):
    # torch's AdamW keeps `step` on the CPU unless capturable; restored onto the parameter's device (a GPU in
    # practice, meta here: any device but the CPU shows it), every step would sync the host once per parameter.
    p, opt, _, _ = stepped(torch.optim.AdamW)
    tensors, params = optimizer_state(opt)
    target = nn.Parameter(torch.empty(SHAPE, device="meta"))
    restored = torch.optim.AdamW([target], lr=1e-3, capturable=capturable)
    load_optimizer_state(restored, tensors, params)
    state = restored.state[target]
    assert state["step"].device.type == ("meta" if capturable else "cpu")
    assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"


def test_state_round_trip_keeps_bnb_codes_and_dtypes():
    p, opt, _, _ = stepped(bnb.optim.AdamW8bit)
    tensors, params = optimizer_state(opt)
    twin = nn.Parameter(p.detach().clone())
    restored = bnb.optim.AdamW8bit([twin], lr=1e-3)
    load_optimizer_state(restored, tensors, params)
    for key, value in opt.state[p].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored.state[twin][key], value) and restored.state[twin][key].dtype == value.dtype


class KernelCalls(TorchDispatchMode):
    """The number of elements of each tensor bnb's 8-bit update kernel is handed (its CPU implementation allocates
    fp32 copies of that many elements: 26 bytes each)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "optimizer_update_8bit_blockwise" in str(func):
            self.sizes.append(args[2].numel())  # (name, g, p, ...)
        return func(*args, **(kwargs or {}))


def test_sliced_8bit_adamw_steps_exactly_like_bnb_in_slices_of_bounded_size():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(300, 1000, generator=g)  # 300,000 elements: 37 slices of 8,192, the last one partial
    whole, sliced = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    reference = bnb.optim.AdamW8bit([whole], lr=1e-3, weight_decay=0.1)
    optimizer = SlicedAdamW8bit([sliced], lr=1e-3, weight_decay=0.1)
    optimizer.slice_elements = 32 * 256
    for _ in range(3):
        grad = torch.randn(init.shape, generator=g)
        whole.grad, sliced.grad = grad.clone(), grad.clone()
        with KernelCalls() as unsliced_calls:
            reference.step()
        with KernelCalls() as calls:
            optimizer.step()
    assert torch.equal(whole, sliced)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(reference.state[whole][key], optimizer.state[sliced][key]), key
    assert unsliced_calls.sizes == [init.numel()]
    assert len(calls.sizes) == 37 and max(calls.sizes) == 32 * 256 and sum(calls.sizes) == init.numel()
