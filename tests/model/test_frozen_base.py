import pytest
import torch
from helpers import QUANTS, TOLERANCE, weight

from lean_relora.memory.trace import LiveBytes
from lean_relora.model.frozen_base import FrozenBase
from lean_relora.tools.fidelity import simulate_restarts


@pytest.mark.parametrize("quant", QUANTS)
def test_forward_matches_dense_within_quantization_error(quant):
    w, bias = weight(), torch.randn(64) * 0.1
    base = FrozenBase(w, bias, quant, dtype=torch.float32)
    x = torch.randn(5, 128)
    reference = x @ w.t() + bias
    assert (base(x) - reference).abs().max() <= TOLERANCE[quant] * reference.abs().max()
    # and it computes with exactly the weight it reports
    torch.testing.assert_close(base(x), x @ base.dequantize().t() + bias, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("quant", QUANTS)
def test_dequantize_is_close_to_the_dense_weight(quant):
    w = weight()
    base = FrozenBase(w, None, quant, dtype=torch.float32)
    assert base.dequantize().shape == w.shape
    assert (base.dequantize() - w).norm() <= TOLERANCE[quant] * w.norm()


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_load_dense_replaces_codes_and_statistics_together(quant):
    base = FrozenBase(weight(seed=0), None, quant, dtype=torch.float32)
    new = weight(seed=1) * 3  # another scale: stale absmax statistics would show
    base.load_dense(new)
    x = torch.randn(4, 128)
    assert (base.dequantize() - new).norm() <= TOLERANCE[quant] * new.norm()
    assert (base(x) - x @ new.t()).abs().max() <= TOLERANCE[quant] * (x @ new.t()).abs().max()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_backward_gives_input_gradient_through_the_frozen_base(quant):
    w = weight()
    base = FrozenBase(w, None, quant, dtype=torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    base(x).sum().backward()
    expected = base.dequantize().sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-2, atol=1e-3)
    assert not any(b.requires_grad for b in base.buffers())


def test_four_bit_storage_is_about_half_a_byte_per_weight():
    # 4 bits of code + one uint8 absmax per 64 weights + an fp32 absmax-of-absmax per 256 blocks = 0.516 bytes
    base = FrozenBase(weight(1024, 512), None, "nf4", blocksize=64, double_quant=True)
    assert 0.515 <= base.stored_bytes() / (1024 * 512) < 0.52


def test_master_copy_stays_in_host_memory_in_fp32():
    w = weight()
    base = FrozenBase(w, None, "nf4", keep_master=True)
    master = base.master.read()
    assert master.dtype == torch.float32 and master.device.type == "cpu"
    torch.testing.assert_close(master, w)
    assert all(name != "master" for name, _ in base.named_buffers())


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("size", [2e-4, 2e-3, 2e-2])
def test_master_keeps_every_merge_across_twenty_restarts(quant, size):
    # Retention of one matrix carries sampling noise (the final quantization error projected on D, the same for
    # quantizing the exact sum once): about +-0.04 at this size, so average three independent matrices.
    results = [simulate_restarts(quant, keep_master=True, relative_delta=size, shape=(512, 1024), rank=8, seed=seed)
               for seed in range(3)]
    assert sum(r.retention for r in results) / 3 >= 0.95
    assert all(r.error_ratio <= 1.05 for r in results)  # as good as quantizing the exact sum once


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_naive_requantization_rounds_small_merges_away(quant):
    result = simulate_restarts(quant, keep_master=False, relative_delta=2e-3, shape=(512, 1024), rank=8)
    assert result.retention < 0.1


@pytest.mark.parametrize("keep_master", [True, False])
def test_retention_probe_estimates_the_exact_retention(keep_master):
    # one 1024 x 1024 layer; a model sums the probes of all its layers, which averages the sampling noise down
    result = simulate_restarts("nf4", keep_master=keep_master, relative_delta=2e-2)
    assert abs(result.probe_retention - result.retention) < 0.1


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_four_bit_computes_in_the_model_dtype_after_a_merge_from_the_fp32_master(quant, dtype):
    # bnb records the dtype of the tensor it quantized and dequantizes to it in backward: a merge from the fp32
    # master must not turn every later backward into a dense fp32 weight.
    base = FrozenBase(weight(256, 512).to(dtype), None, quant, keep_master=True, dtype=dtype)
    base.add_low_rank_(torch.randn(256, 4) * 1e-3, torch.randn(4, 512), 1.0)
    assert base.quant_state.dtype == dtype


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_backward_transient_is_the_same_before_and_after_a_merge(quant):
    base = FrozenBase(weight(1024, 1024).bfloat16(), None, quant, keep_master=True, dtype=torch.bfloat16)
    x = torch.randn(4, 1024, dtype=torch.bfloat16, requires_grad=True)

    def backward_peak() -> int:
        with LiveBytes(x) as tracker:
            base(x).sum().backward()
        return tracker.peak

    before = backward_peak()
    base.add_low_rank_(torch.randn(1024, 4) * 1e-3, torch.randn(4, 1024), 1.0)
    assert backward_peak() == before


def test_int8_base_computes_the_same_function_in_train_and_eval_mode():
    # bnb's int8 matmul quantizes the activations per row in eval mode (and always on CUDA) but not in CPU
    # training; the base must compute one function everywhere: the int8 weight times unquantized activations.
    w = weight()
    w[:, :4] *= 30  # outlier weight columns ...
    base = FrozenBase(w, None, "int8", dtype=torch.float32)
    x = torch.randn(8, 128)
    x[:, :4] *= 100  # ... and outlier activation channels, where int8 activations lose the most
    base.train()
    in_training = base(x)
    base.eval()
    torch.testing.assert_close(base(x), in_training, rtol=0, atol=0)
    torch.testing.assert_close(in_training, x @ base.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_int8_base_does_not_overflow_on_large_bf16_activations():
    # bnb's int8 path casts activations to fp16 (max 65504); bf16 activations reach far beyond that
    base = FrozenBase(weight(), None, "int8", dtype=torch.bfloat16)
    x = torch.full((2, 128), 1e6, dtype=torch.bfloat16)
    for training in (True, False):
        base.train(training)
        assert torch.isfinite(base(x)).all()


def test_int8_backward_keeps_no_dense_weight_alive():
    # the dequantized weight is rebuilt in backward, not saved: a saved dense copy of every layer would cost
    # more activation memory than the int8 weights themselves
    base = FrozenBase(weight(1024, 1024), None, "int8", dtype=torch.bfloat16)
    x = torch.randn(2, 1024, dtype=torch.bfloat16, requires_grad=True)
    with LiveBytes(x) as tracker:
        y = base(x)
        held = tracker.current - x.untyped_storage().nbytes() - y.untyped_storage().nbytes()
    assert held < 1024 * 1024  # well under the 2 MiB of a dense bf16 copy
