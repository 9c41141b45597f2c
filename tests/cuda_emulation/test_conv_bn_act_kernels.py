"""The CUDA kernels of conv_bn_act (csrc/cuda/conv_bn_act_kernels.cuh), run on the CPU
through the host emulation (csrc/emulation/cuda_host_emulation.h) and checked against
plain torch in float64.

The harness (conv_bn_act_harness.cpp) is built once with g++ by emulation_build.py into
a cache folder under the temp dir keyed by the hash of its sources and flags. Every output buffer is filled
with NaN before the kernels run, so an element they fail to write shows up.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

import emulation_build

HARNESS = "conv_bn_act_harness.cpp"

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "batch_stats": [P, I64, I64, I64, INT, INT, P, P],
    "scale_shift_act": [P, P, P, P, I64, I64, I64, INT, INT, INT, P],
    "backward_reduce": [P, P, P, P, P, I64, I64, I64, INT, INT, INT, P, P],
    "backward_elementwise": [P, P, P, P, P, P, P, I64, I64, I64, INT, INT, INT, P, P],
}


@pytest.fixture(scope="module")
def lib():
    return emulation_build.load(HARNESS, SIGNATURES)


def _call(lib, name, dtype, *args):
    emulation_build.call(lib, name, dtype, *args)


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))  # keeps t's memory format


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "some elements were never written"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-12


# (shape [N, C, H, W], max_blocks): max_blocks caps the grid as the GPU's block budget
# does, to force grid-stride loops and several partials per channel.
CASES = [
    ((2, 5, 7, 9), 1024),   # 630 elements: not a multiple of the 256-thread block
    ((3, 5, 17, 19), 16),   # rows > threads: several partials and grid-stride loops
    ((2, 37, 6, 5), 64),    # odd C: the NHWC second channel tile is partly empty
    ((3, 40, 3, 3), 8),     # fewer blocks than channels (NCHW), two NHWC channel tiles
    ((2, 3, 1, 1), 1024),   # S = 1: NCHW and NHWC are the same memory
]
CASE_IDS = ["630el", "multiblock", "C37", "C40", "S1"]
DTYPES = [torch.float32, torch.float64]


def _elementwise_cases(test):
    """Parametrises an elementwise-pass test over dtype, layout, the first three shapes
    and the activation."""
    for mark in (pytest.mark.parametrize("relu", [True, False], ids=["relu", "none"]),
                 pytest.mark.parametrize("shape,max_blocks", CASES[:3], ids=CASE_IDS[:3]),
                 pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"]),
                 pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])):
        test = mark(test)
    return test


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,max_blocks", CASES, ids=CASE_IDS)
def test_batch_stats(lib, shape, max_blocks, channels_last, dtype):
    n, c, h, w = shape
    y = _layout(torch.randn(shape, dtype=dtype) * 2 + torch.randn(1, c, 1, 1, dtype=dtype), channels_last)
    mean = torch.full((c,), float("nan"), dtype=dtype)
    var = torch.full((c,), float("nan"), dtype=dtype)
    _call(lib, "batch_stats", dtype, y, n, c, h * w, int(channels_last), max_blocks, mean, var)
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    assert _rel(mean, ref_mean) < _tol(dtype)
    assert _rel(var, ref_var) < _tol(dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_stats_large_mean_offset(lib, channels_last):
    """|mean| / std = 1e5 in float32: a sum / sum-of-squares variance would be noise and
    unshifted float32 Welford is off by ~4e-4; the shifted Welford keeps ~1e-7."""
    shape, max_blocks = (3, 5, 17, 19), 16
    n, c, h, w = shape
    y = _layout(1000 + 0.01 * torch.randn(shape), channels_last)
    mean = torch.full((c,), float("nan"))
    var = torch.full((c,), float("nan"))
    _call(lib, "batch_stats", torch.float32, y, n, c, h * w, int(channels_last), max_blocks, mean, var)
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    assert _rel(mean, ref_mean) < 1e-6
    assert _rel(var, ref_var) < 1e-5


def _per_channel(c, dtype, positive=False):
    t = torch.randn(c, dtype=dtype)
    return t.abs() + 0.5 if positive else t


@_elementwise_cases
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "noresidual"])
def test_scale_shift_act(lib, shape, max_blocks, channels_last, dtype, relu, with_residual):
    n, c, h, w = shape
    y = _layout(torch.randn(shape, dtype=dtype), channels_last)
    scale, shift = _per_channel(c, dtype), _per_channel(c, dtype)
    residual = _layout(torch.randn(shape, dtype=dtype), channels_last) if with_residual else None
    out = _poisoned_like(y)
    _call(lib, "scale_shift_act", dtype, y, scale, shift, residual, n, c, h * w, int(channels_last),
          int(relu), max_blocks, out)
    ref = y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if with_residual:
        ref = ref + residual.double()
    if relu:
        ref = ref.relu()
    assert _rel(out, ref) < _tol(dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_scale_shift_act_in_place(lib, channels_last):
    """The driver's eval path passes out = y."""
    shape, max_blocks = (3, 5, 17, 19), 16
    n, c, h, w = shape
    y = _layout(torch.randn(shape), channels_last)
    scale, shift = _per_channel(c, torch.float32), _per_channel(c, torch.float32)
    ref = (y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)).relu()
    _call(lib, "scale_shift_act", torch.float32, y, scale, shift, None, n, c, h * w,
          int(channels_last), 1, max_blocks, y)
    assert _rel(y, ref) < 1e-5


def _backward_inputs(shape, channels_last, dtype):
    c = shape[1]
    y = _layout(torch.randn(shape, dtype=dtype) + torch.randn(1, c, 1, 1, dtype=dtype), channels_last)
    grad_out = _layout(torch.randn(shape, dtype=dtype), channels_last)
    out = _layout(torch.randn(shape, dtype=dtype), channels_last)  # only its sign matters
    mean = y.double().mean(dim=(0, 2, 3)).to(dtype)
    invstd = _per_channel(c, dtype, positive=True)
    return y, grad_out, out, mean, invstd


def _masked(grad_out, out, relu):
    g = grad_out.double()
    return torch.where(out > 0, g, torch.zeros_like(g)) if relu else g


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,max_blocks", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "none"])
def test_backward_reduce(lib, shape, max_blocks, channels_last, dtype, relu):
    n, c, h, w = shape
    y, grad_out, out, mean, invstd = _backward_inputs(shape, channels_last, dtype)
    sum_g = torch.full((c,), float("nan"), dtype=dtype)
    sum_g_xhat = torch.full((c,), float("nan"), dtype=dtype)
    _call(lib, "backward_reduce", dtype, grad_out, out if relu else None, y, mean, invstd,
          n, c, h * w, int(channels_last), int(relu), max_blocks, sum_g, sum_g_xhat)
    g = _masked(grad_out, out, relu)
    xhat = (y.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
    assert _rel(sum_g, g.sum(dim=(0, 2, 3))) < _tol(dtype)
    assert _rel(sum_g_xhat, (g * xhat).sum(dim=(0, 2, 3))) < _tol(dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_reduce_without_y(lib, channels_last):
    """Eval without grad_bn_weight: y absent, only sum_g; sum_g_xhat, mean, invstd untouched."""
    shape, max_blocks = (3, 5, 17, 19), 16
    n, c, h, w = shape
    _, grad_out, out, _, _ = _backward_inputs(shape, channels_last, torch.float32)
    sum_g = torch.full((c,), float("nan"))
    _call(lib, "backward_reduce", torch.float32, grad_out, out, None, None, None,
          n, c, h * w, int(channels_last), 1, max_blocks, sum_g, None)
    assert _rel(sum_g, _masked(grad_out, out, True).sum(dim=(0, 2, 3))) < 1e-5


@_elementwise_cases
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_elementwise(lib, shape, max_blocks, channels_last, dtype, relu, training):
    _check_backward_elementwise(lib, shape, max_blocks, channels_last, dtype, relu, training, "both")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("wanted", ["grad_y", "grad_pre"])
def test_backward_elementwise_one_output(lib, channels_last, training, wanted):
    """Only one of grad_y (conv grads wanted) and grad_pre (residual grad wanted)."""
    shape, max_blocks = CASES[1]
    _check_backward_elementwise(lib, shape, max_blocks, channels_last, torch.float32, True, training, wanted)


def _check_backward_elementwise(lib, shape, max_blocks, channels_last, dtype, relu, training, wanted):
    n, c, h, w = shape
    y, grad_out, out, mean, _ = _backward_inputs(shape, channels_last, dtype)
    g_scale, y_scale, shift = _per_channel(c, dtype), _per_channel(c, dtype), _per_channel(c, dtype)
    grad_y = _poisoned_like(y) if wanted in ("both", "grad_y") else None
    grad_pre = _poisoned_like(y) if wanted in ("both", "grad_pre") else None
    _call(lib, "backward_elementwise", dtype, grad_out, out if relu else None,
          y if training else None, mean if training else None, g_scale,
          y_scale if training else None, shift, n, c, h * w, int(channels_last), int(relu),
          max_blocks, grad_y, grad_pre)
    g = _masked(grad_out, out, relu)
    if grad_y is not None:
        ref = g * g_scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        if training:
            ref = ref - (y.double() - mean.double().view(1, -1, 1, 1)) * y_scale.double().view(1, -1, 1, 1)
        assert _rel(grad_y, ref) < _tol(dtype)
    if grad_pre is not None:
        assert _rel(grad_pre, g) == 0.0
