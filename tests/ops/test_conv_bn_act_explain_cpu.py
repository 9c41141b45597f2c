"""explain() names the path the cpu backend of conv_bn_act really takes: the profiler
shows which convolution ran, oneDNN's fused mkldnn::_convolution_pointwise or ATen's.
(The cuda backend's explain is checked in tests/cuda_emulation/test_conv_bn_act_choice.py.)"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import cnnkernels
from cnnkernels import _library, ops
from helpers import skip_or_fail

CL = torch.channels_last


@pytest.fixture(autouse=True)
def native_cpu():
    if not _library.extension_loaded() or not _library.has_native_kernel("_conv_bn_act_forward_native", "CPU"):
        skip_or_fail("cnnkernels._C with CPU kernels is not loaded")


def _call(dtype, fmt, training=False, residual=False, activation="relu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(dtype).contiguous(memory_format=fmt)
    weight = torch.randn(16, 8, 3, 3, generator=gen).to(dtype)
    channel = torch.rand(16, generator=gen).to(dtype) + 0.5
    res = torch.randn(2, 16, 6, 6, generator=gen).to(dtype).contiguous(memory_format=fmt) if residual else None
    return (x, weight, None, channel, channel, channel.clone(), channel.clone()), dict(
        padding=1, training=training, residual=res, activation=activation)


def _convolutions_run(args, kwargs) -> tuple[bool, bool]:
    """(oneDNN's fused op ran, an ATen convolution ran) during one forward on the cpu backend."""
    with cnnkernels.use_backend("cpu"), profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.conv_bn_act(*args, **kwargs)
    names = {event.name for event in prof.events()}
    return "mkldnn::_convolution_pointwise" in names, "aten::convolution" in names


CASES = [  # (dtype, memory format, training, residual, activation, expected path)
    (torch.float32, CL, False, False, "relu", "onednn_fused"),
    (torch.float32, CL, False, True, "relu", "onednn_fused"),
    (torch.float32, CL, False, True, "none", "onednn_fused"),
    (torch.float32, torch.contiguous_format, False, False, "relu", "onednn_fused"),
    (torch.float32, torch.contiguous_format, False, True, "relu", "onednn_fused"),
    (torch.float32, CL, False, False, "none", "aten_folded"),
    (torch.float64, CL, False, False, "none", "aten_folded"),
    (torch.float64, CL, False, True, "relu", "aten_pass"),
    (torch.float16, CL, False, False, "relu", "aten_pass"),
    (torch.float32, CL, True, True, "relu", "aten_pass"),
    (torch.bfloat16, CL, True, False, "relu", "aten_pass"),
    # torch's .binary form rejects NCHW bfloat16 (and a CPU without bf16 support rejects all)
    (torch.bfloat16, torch.contiguous_format, False, True, "relu", "aten_pass"),
]


@pytest.mark.parametrize("dtype,fmt,training,residual,activation,expected", CASES)
def test_cpu_explain_names_the_path_that_runs(dtype, fmt, training, residual, activation, expected):
    args, kwargs = _call(dtype, fmt, training, residual, activation)
    verdict = ops.explain("conv_bn_act", *args, **kwargs)
    assert verdict["backend"] == "cpu"
    assert verdict["kernel"].split(":")[0] == expected, verdict["kernel"]
    onednn, aten = _convolutions_run(args, kwargs)
    assert onednn == (expected == "onednn_fused")
    # torch runs the .binary op unfused (an ATen convolution inside it) on NCHW data; explain says so.
    unfused = "unfused" in verdict["kernel"]
    assert unfused == (expected == "onednn_fused" and residual and fmt != CL)
    assert aten == (expected != "onednn_fused" or unfused)


def test_cpu_explain_bfloat16_follows_onednn_support():
    """Eval bfloat16 with ReLU is fused exactly where oneDNN supports bfloat16 on this CPU
    (elsewhere the first call tries oneDNN once, fails, and every call runs ATen)."""
    args, kwargs = _call(torch.bfloat16, CL)
    kernel = ops.explain("conv_bn_act", *args, **kwargs)["kernel"]
    supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert kernel.startswith("onednn_fused:" if supported else "aten_pass:"), kernel
    _convolutions_run(args, kwargs)
    assert _convolutions_run(args, kwargs) == (supported, not supported)


def test_cpu_explain_follows_the_mkldnn_switch():
    args, kwargs = _call(torch.float32, CL)
    with torch.backends.mkldnn.flags(enabled=False):
        assert ops.explain("conv_bn_act", *args, **kwargs)["kernel"].startswith("aten_pass:")
        assert _convolutions_run(args, kwargs) == (False, True)
