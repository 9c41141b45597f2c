"""The CUDA kernels of bn_act_conv (csrc/cuda/bn_act_conv_kernels.cuh), run on the CPU
through the host emulation (csrc/emulation/cuda_host_emulation.h) and checked against
plain torch in float64: F.batch_norm -> activation -> F.conv2d, autograd for the backward.

The harness (bn_act_conv_harness.cpp) is built once with g++ by emulation_build.py. The
tests compose the kernels as csrc/cuda/bn_act_conv.cu does (statistics, scale/shift,
fused conv; recompute, reduce, elementwise backward) on x given as a channel-prefix view
of a wider NCHW or NHWC buffer, and write out into a channel slice of a NaN-filled buffer
whose other channels must stay NaN.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import emulation_build

HARNESS = "bn_act_conv_harness.cpp"

P, INT = ctypes.c_void_p, ctypes.c_int
SIGNATURES = {
    "batch_stats": [P, P, P, INT, P, P],
    "conv": [P, P, P, P, P, INT, P, P, P, P, P, P, INT],
    "bn_act": [P, P, P, P, P, INT, INT, P, P],
    "backward_reduce": [P, P, P, P, P, P, P, P, P, INT, INT, P, P],
    "backward_elementwise": [P, P, P, P, P, P, P, P, P, P, P, INT, INT, P, P],
}
EPS = 1e-5
WIDE, NARROW = 1, 2  # harness tile codes; 0 = the launcher's choice


@pytest.fixture(scope="module")
def lib():
    handle = emulation_build.load(HARNESS, SIGNATURES)
    handle.conv_plan.argtypes, handle.conv_plan.restype = [P, P, P, P, P, INT], INT
    return handle


def _call(lib, name, dtype, *args):
    emulation_build.call(lib, name, dtype, *args)


def _i64(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "some elements were never written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _tol(dtype):
    return 2e-5 if dtype == torch.float32 else 1e-12


def _view(shape, layout, extra, dtype, fill=None, offset=0):
    """A [N, C, H, W] channel slice [offset, offset + C) of a buffer with `extra` more
    channels, NCHW ("nchw") or channels_last ("nhwc"), or a dense tensor ("dense")."""
    n, c, h, w = shape
    if layout == "dense":
        return torch.randn(shape, dtype=dtype) if fill is None else torch.full(shape, fill, dtype=dtype)
    full = (n, c + extra, h, w)
    buf = torch.randn(full, dtype=dtype) if fill is None else torch.full(full, fill, dtype=dtype)
    if layout == "nhwc":
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf[:, offset:offset + c]


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    dilation: tuple = (1, 1)
    groups: int = 1

    def geometry(self) -> torch.Tensor:
        return _i64([*self.stride, *self.padding, *self.dilation, self.groups])

    def out_shape(self):
        ho = (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return (self.n, self.c_out, ho, wo)

    def conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


CASES = [
    Case("1x1", 2, 6, 24, 5, 6, kernel=(1, 1), padding=(0, 0)),
    Case("3x3", 2, 6, 8, 6, 5),
    Case("stride2", 2, 5, 7, 7, 7, stride=(2, 2)),
    Case("dilation2", 1, 4, 6, 7, 8, padding=(2, 2), dilation=(2, 2)),
    Case("groups2", 2, 6, 8, 5, 5, groups=2),
    Case("depthwise", 2, 6, 6, 5, 5, groups=6),
    Case("3to5", 2, 3, 5, 6, 6),
    Case("batch1", 1, 8, 20, 4, 4),
    Case("2x3_asym", 2, 4, 18, 5, 7, kernel=(2, 3), stride=(1, 2), padding=(0, 1)),
    Case("two_tiles", 2, 12, 70, 7, 7),  # wide: 2 row tiles x 2 column tiles, 7 k stages
]
CASE_IDS = [c.name for c in CASES]
# (x layout, out layout): prefix views of NCHW / NHWC buffers, out slices of either.
LAYOUTS = [("nchw", "nchw"), ("nhwc", "nhwc"), ("nhwc", "nchw"), ("nchw", "nhwc")]
LAYOUT_IDS = ["x_nchw-out_nchw", "x_nhwc-out_nhwc", "x_nhwc-out_nchw", "x_nchw-out_nhwc"]


def _inputs(case: Case, dtype, x_layout, seed=0):
    torch.manual_seed(seed)
    shape = (case.n, case.c_in, case.h, case.w)
    x = _view(shape, x_layout, extra=3, dtype=dtype)
    x.mul_(1.5).add_(torch.randn(1, case.c_in, 1, 1, dtype=dtype))  # non-zero channel means
    weight = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, dtype=dtype) * 0.3
    bias = torch.randn(case.c_out, dtype=dtype) * 0.1
    gamma = torch.randn(case.c_in, dtype=dtype) * 0.3 + 1
    beta = torch.randn(case.c_in, dtype=dtype) * 0.3
    running_mean = torch.randn(case.c_in, dtype=dtype) * 0.5
    running_var = torch.rand(case.c_in, dtype=dtype) + 0.5
    return x, weight, bias, gamma, beta, running_mean, running_var


def _reference_forward(case, x, weight, bias, gamma, beta, running_mean, running_var, training, relu):
    z = F.batch_norm(x.double(), running_mean.double().clone(), running_var.double().clone(), gamma.double(),
                     beta.double(), training, 0.1, EPS)
    a = z.relu() if relu else z
    return F.conv2d(a, weight.double(), None if bias is None else bias.double(), **case.conv_kwargs())


def _stats(lib, x, max_blocks=1024):
    c = x.shape[1]
    mean = torch.full((c,), float("nan"), dtype=x.dtype)
    var = torch.full((c,), float("nan"), dtype=x.dtype)
    _call(lib, "batch_stats", x.dtype, x, _i64(x.shape), _i64(x.stride()), max_blocks, mean, var)
    return mean, var


def _scale_shift(mean, var, gamma, beta):
    """As csrc/cuda/bn_act_conv.cu computes them (statistics dtype)."""
    scale = gamma * torch.rsqrt(var + EPS)
    return scale, beta - mean * scale


def _conv(lib, case, x, scale, shift, relu, weight, bias, out, tile=0):
    w = weight.permute(0, 2, 3, 1).contiguous()  # [C_out, kH, kW, Cg], as the launcher passes it
    _call(lib, "conv", x.dtype, x, _i64(x.shape), _i64(x.stride()), scale, shift, int(relu), w,
          _i64(weight.shape), bias, case.geometry(), out, _i64(out.stride()), tile)


def _forward(lib, case, inputs, training, relu, out, tile=0):
    x, weight, bias, gamma, beta, running_mean, running_var = inputs
    mean, var = _stats(lib, x) if training else (running_mean, running_var)
    scale, shift = _scale_shift(mean, var, gamma, beta)
    _conv(lib, case, x, scale, shift, relu, weight, bias, out, tile)
    return mean, var


def _out_slice(case, layout, dtype):
    """out = a channel slice [2, 2 + C_out) of a NaN-filled buffer, and the buffer."""
    out = _view(case.out_shape(), layout, extra=5, dtype=dtype, fill=float("nan"), offset=2)
    return out, out._base if out._base is not None else out


def _check_untouched(buf, c_out):
    assert buf[:, :2].isnan().all() and buf[:, 2 + c_out:].isnan().all(), "wrote outside the out slice"


@pytest.mark.parametrize("mode", [(True, True), (False, False)], ids=["train-relu", "eval-none"])
@pytest.mark.parametrize("layouts", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward(lib, case, layouts, mode):
    training, relu = mode
    _check_forward(lib, case, layouts, training, relu, torch.float32)


@pytest.mark.parametrize("mode", [(True, False), (False, True)], ids=["train-none", "eval-relu"])
@pytest.mark.parametrize("layouts", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6]], ids=["3x3", "depthwise", "3to5"])
def test_forward_other_modes(lib, case, layouts, mode):
    training, relu = mode
    _check_forward(lib, case, layouts, training, relu, torch.float32)


@pytest.mark.parametrize("layouts", LAYOUTS[2:], ids=LAYOUT_IDS[2:])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[9]], ids=["3x3", "groups2", "two_tiles"])
def test_forward_mixed_layouts(lib, case, layouts):
    _check_forward(lib, case, layouts, True, True, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=["1x1", "stride2", "depthwise"])
def test_forward_float64(lib, case, training):
    _check_forward(lib, case, LAYOUTS[1], training, True, torch.float64)


def _check_forward(lib, case, layouts, training, relu, dtype, tile=0):
    x_layout, out_layout = layouts
    inputs = _inputs(case, dtype, x_layout)
    out, buf = _out_slice(case, out_layout, dtype)
    mean, var = _forward(lib, case, inputs, training, relu, out, tile)
    ref = _reference_forward(case, *inputs, training, relu)
    assert _rel(out, ref) < _tol(dtype)
    _check_untouched(buf, case.c_out)
    if training:
        ref_var, ref_mean = torch.var_mean(inputs[0].double(), dim=(0, 2, 3), unbiased=False)
        assert _rel(mean, ref_mean) < _tol(dtype)
        assert _rel(var, ref_var) < _tol(dtype)


@pytest.mark.parametrize("tile", [WIDE, NARROW], ids=["wide", "narrow"])
@pytest.mark.parametrize("layouts", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[9]], ids=["3x3", "depthwise", "two_tiles"])
def test_forward_every_tile(lib, case, layouts, tile):
    """Both tile shapes, each with both A-load mappings (channel-fast and pixel-fast x)."""
    _check_forward(lib, case, layouts, False, True, torch.float32, tile)


def _plan(lib, case, x, out, tile=0):
    arrays = [_i64(x.shape), _i64(x.stride()), _i64([case.c_out, case.c_in // case.groups, *case.kernel]),
              case.geometry(), _i64(out.stride())]  # kept alive across the call
    return lib.conv_plan(*[a.data_ptr() for a in arrays], tile)


def test_launch_plan(lib):
    """The launcher's choices: the tile by C_out / groups, the A-load mapping by x's
    layout, the epilogue mapping by out's layout (codes as in the harness's conv_plan)."""
    wide, narrow = CASES[0], CASES[5]
    for case, tile_code in ((wide, 0), (narrow, 2)):
        for x_layout, channels_fast in (("nchw", False), ("nhwc", True)):
            for out_layout, out_pixel_fast in (("nchw", True), ("nhwc", False)):
                x = _inputs(case, torch.float32, x_layout)[0]
                out, _ = _out_slice(case, out_layout, torch.float32)
                expected = tile_code + (0 if channels_fast else 1) + (4 if out_pixel_fast else 0)
                assert _plan(lib, case, x, out) == expected, (case.name, x_layout, out_layout)


def test_stats_prefix_views_multiblock(lib):
    """Several partials per channel and grid-stride loops (max_blocks 4), prefix views."""
    for layout in ("nchw", "nhwc"):
        torch.manual_seed(1)
        x = _view((3, 37, 9, 11), layout, extra=4, dtype=torch.float32)
        x.add_(torch.randn(1, 37, 1, 1))
        mean, var = _stats(lib, x, max_blocks=4)
        ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
        assert _rel(mean, ref_mean) < 1e-6
        assert _rel(var, ref_var) < 1e-5


def test_stats_large_mean_offset(lib):
    """|mean| / std = 1e5 in float32: the shifted Welford keeps ~1e-6 on the variance."""
    for layout in ("nchw", "nhwc"):
        torch.manual_seed(2)
        x = _view((3, 5, 17, 19), layout, extra=2, dtype=torch.float32)
        x.mul_(0.01).add_(1000)
        mean, var = _stats(lib, x, max_blocks=16)
        ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
        assert _rel(mean, ref_mean) < 1e-6
        assert _rel(var, ref_var) < 1e-5


def test_stats_arbitrary_strides(lib):
    """x with permuted, non-dense strides (no collapsible H*W)."""
    torch.manual_seed(3)
    buf = torch.randn(4, 9, 6, 10)
    x = buf.permute(0, 3, 1, 2)[:, ::2, :, 1:8]  # [4, 5, 9, 7], every stride odd
    mean, var = _stats(lib, x, max_blocks=8)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert _rel(mean, ref_mean) < 1e-6
    assert _rel(var, ref_var) < 1e-5


# --- backward ---------------------------------------------------------------------------

def _reference_backward(case, inputs, training, relu, grad_out):
    """Every gradient of conv2d(act(batch_norm(x))) by autograd in float64, plus a."""
    x, weight, bias, gamma, beta, running_mean, running_var = inputs
    leaves = [t.detach().double().requires_grad_() for t in (x, gamma, beta)]
    z = F.batch_norm(leaves[0], running_mean.double().clone(), running_var.double().clone(), leaves[1], leaves[2],
                     training, 0.1, EPS)
    a = z.relu() if relu else z
    out = F.conv2d(a, weight.double(), bias.double(), **case.conv_kwargs())
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return a.detach(), grads


def _backward_case(lib, case, dtype, x_layout, grad_layout, training, relu, max_blocks):
    inputs = _inputs(case, dtype, x_layout, seed=5)
    x, weight, bias, gamma, beta, running_mean, running_var = inputs
    grad_out = torch.randn(case.out_shape(), dtype=dtype)
    a_ref, (gx_ref, ggamma_ref, gbeta_ref) = _reference_backward(case, inputs, training, relu, grad_out)
    if training:
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
        mean, var = mean.to(dtype), var.to(dtype)
    else:
        mean, var = running_mean, running_var
    scale, shift = _scale_shift(mean, var, gamma, beta)
    invstd = torch.rsqrt(var + EPS)
    fmt = torch.channels_last if grad_layout == "nhwc" else torch.contiguous_format
    shape = _i64(x.shape)

    # The recomputed input of ATen's convolution_backward.
    a = torch.full(x.shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    _call(lib, "bn_act", dtype, x, shape, _i64(x.stride()), scale, shift, int(relu), max_blocks, a,
          _i64(a.stride()))
    assert _rel(a, a_ref) < _tol(dtype)

    # grad_a as ATen's convolution_backward gives it (a dense tensor, either format).
    grad_a = torch.nn.grad.conv2d_input(x.shape, weight.double(), grad_out.double(), **case.conv_kwargs())
    grad_a = grad_a.to(dtype).contiguous(memory_format=fmt)
    sum_g = torch.full((case.c_in,), float("nan"), dtype=dtype)
    sum_g_xhat = torch.full((case.c_in,), float("nan"), dtype=dtype)
    _call(lib, "backward_reduce", dtype, grad_a, _i64(grad_a.stride()), x, _i64(x.stride()), shape, scale, shift,
          mean, invstd, int(relu), max_blocks, sum_g, sum_g_xhat)
    assert _rel(sum_g, gbeta_ref) < _tol(dtype)
    assert _rel(sum_g_xhat, ggamma_ref) < _tol(dtype)

    # As bn_act_conv_driver.h sets the coefficients.
    count = x.numel() // x.shape[1]
    g_scale = gamma * invstd
    x_scale = g_scale * invstd * sum_g_xhat / count if training else None
    g_shift = -g_scale * sum_g / count if training else torch.zeros_like(g_scale)
    grad_x = torch.full(x.shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    _call(lib, "backward_elementwise", dtype, grad_a, _i64(grad_a.stride()), x, _i64(x.stride()), shape, scale,
          shift, g_scale, g_shift, mean, x_scale, int(relu), max_blocks, grad_x, _i64(grad_x.stride()))
    assert _rel(grad_x, gx_ref) < _tol(dtype)


@pytest.mark.parametrize("mode", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["train-relu", "eval-relu", "train-none", "eval-none"])
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("nhwc", "nhwc"), ("nchw", "nhwc")],
                         ids=["x_nchw-grad_nchw", "x_nhwc-grad_nhwc", "x_nchw-grad_nhwc"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[6]], ids=["3x3", "stride2", "groups2", "3to5"])
def test_backward(lib, case, layouts, mode):
    training, relu = mode
    _backward_case(lib, case, torch.float32, *layouts, training, relu, max_blocks=1024)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_float64_multiblock(lib, training):
    """float64, and max_blocks 3: several partials per channel, grid-stride loops."""
    _backward_case(lib, Case("big", 3, 7, 5, 9, 11), torch.float64, "nhwc", "nchw", training, True, max_blocks=3)


def test_backward_reduce_sum_g_only(lib):
    """Only grad_bn_bias wanted: sum_g_xhat absent (null), mean and invstd not read."""
    case = CASES[1]
    inputs = _inputs(case, torch.float32, "nhwc", seed=7)
    x, weight, bias, gamma, beta, running_mean, running_var = inputs
    grad_out = torch.randn(case.out_shape())
    _, (_, _, gbeta_ref) = _reference_backward(case, inputs, False, True, grad_out)
    scale, shift = _scale_shift(running_mean, running_var, gamma, beta)
    grad_a = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, **case.conv_kwargs())
    sum_g = torch.full((case.c_in,), float("nan"))
    _call(lib, "backward_reduce", torch.float32, grad_a, _i64(grad_a.stride()), x, _i64(x.stride()), _i64(x.shape),
          scale, shift, None, None, 1, 16, sum_g, None)
    assert _rel(sum_g, gbeta_ref) < 1e-5
