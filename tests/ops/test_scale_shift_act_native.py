"""The native helper _scale_shift_act_into_native (the frozen DenseNet path's
relu(bn(prefix)) pass): against float64 arithmetic on random inputs, in float32 and
bfloat16, for dense and channel-prefix-view inputs in both memory formats; the ReLU's
exact invariants. Its argument errors are in test_native_cpu_arguments.py."""
import pytest
import torch

import cnnkernels  # noqa: F401  (loads cnnkernels._C when it is built)
from cnnkernels import _library
from helpers import skip_or_fail

OP = "_scale_shift_act_into_native"


@pytest.fixture(autouse=True)
def _require_kernel():
    if not _library.has_native_kernel(OP, "CPU"):
        skip_or_fail(f"cnnkernels._C with the CPU kernel {OP} is not loaded")


def inputs(dtype, channels_last, prefix, seed):
    gen = torch.Generator().manual_seed(seed)
    c = 19
    full = torch.randn(3, c + (5 if prefix else 0), 6, 7, generator=gen).to(dtype)
    if channels_last:
        full = full.contiguous(memory_format=torch.channels_last)
    x = full[:, :c] if prefix else full
    scale = torch.randn(c, generator=gen) * 2
    shift = torch.randn(c, generator=gen)
    return x, scale, shift


def run(x, scale, shift, activation, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.full(x.shape, float("nan"), dtype=x.dtype).contiguous(memory_format=fmt)
    assert torch.ops.cnnkernels._scale_shift_act_into_native(z, x, scale, shift, activation) is None
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_matches_float64(dtype, channels_last, prefix, activation):
    x, scale, shift = inputs(dtype, channels_last, prefix, seed=3)
    z = run(x, scale, shift, activation, channels_last)
    exact = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if activation == "relu":
        exact = exact.clamp_min(0)
    # one rounding to dtype of a float32 product-sum: within one unit in the last place
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22
    assert torch.all((z.double() - exact).abs() <= ulp * exact.abs() + 1e-6)
    if activation == "relu":
        assert (z >= 0).all()
        assert (z[exact < -1e-3] == 0).all()
        assert (z[exact > 1e-3] > 0).all()
    else:
        assert (z < 0).any()


def test_per_channel_coefficients_are_not_shuffled():
    x = torch.ones(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
    shift = torch.tensor([0.5, -3.0, 0.0, -10.0])
    z = run(x, scale, shift, "relu", channels_last=True)
    assert z[:, :, 1, 2].tolist() == [[1.5, 0.0, 3.0, 0.0]] * 2


@pytest.mark.parametrize("channels_last", [True, False])
def test_relu_is_exact_next_to_zero(channels_last):
    """x chosen to put x * scale + shift 1e-5 to 1e-3 below or above zero: exactly 0 below,
    positive above (a ReLU that lets values just below zero through fails here)."""
    x, scale, shift = inputs(torch.float32, channels_last, prefix=False, seed=4)
    gen = torch.Generator().manual_seed(5)
    magnitude = 10 ** (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 5)
    near = torch.where(torch.rand(x.shape, generator=gen) < 0.5, -magnitude, magnitude)
    s64, b64 = scale.double().view(1, -1, 1, 1), shift.double().view(1, -1, 1, 1)
    x = ((near - b64) / s64).float().contiguous(memory_format=torch.channels_last if channels_last
                                                 else torch.contiguous_format)
    exact = x.double() * s64 + b64
    z = run(x, scale, shift, "relu", channels_last)
    assert (exact < -1e-5).any() and (exact > 1e-5).any()
    assert (z >= 0).all()
    assert (z[exact < -1e-5] == 0).all(), "ReLU output not exactly 0 just below zero"
    assert (z[exact > 1e-5] > 0).all()
