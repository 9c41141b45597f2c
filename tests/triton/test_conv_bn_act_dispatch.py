"""Which Triton forward kernel conv_bn_act picks by shape, as cnnkernels.ops.explain and
python -m cnnkernels.info report it (no kernel runs here)."""
from __future__ import annotations

import pytest
import torch

import cnnkernels
from cnnkernels import info, ops
from cnnkernels.triton import conv_bn_act as triton_conv_bn_act


def _explain(c_in, c_out, k, groups=1, dtype=torch.float32, channels_last=True, **kwargs):
    x = torch.randn(2, c_in, 8, 8, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=dtype)
    stats = torch.ones(c_out), torch.ones(c_out)
    with cnnkernels.use_backend("triton"):
        verdict = ops.explain("conv_bn_act", x, weight, None, None, None, *stats, groups=groups, **kwargs)
    assert verdict["backend"] == "triton"
    return verdict["kernel"]


def test_explain_names_the_1x1_gemm():
    kernel = _explain(64, 256, 1, stride=2)
    assert kernel.startswith("triton conv1x1 GEMM + fused BN/residual/act epilogue")
    assert "stride 2" in kernel and "[N*H_out*W_out, 64] x [64, 256] GEMM" in kernel
    assert "tiles 64x64x32" in kernel and "vector access" in kernel  # float32 on CPU: "ieee" dots
    assert "tiles 128x128x64, 8 warps" in _explain(64, 256, 1, dtype=torch.bfloat16)
    assert "tiles 64x64x32, 8 warps, scalar" in _explain(64, 256, 1, dtype=torch.bfloat16, channels_last=False)
    assert "scalar" in _explain(40, 256, 1, dtype=torch.bfloat16)  # C_in % 16 != 0: unaligned rows


def test_explain_names_the_grouped_kernel():
    kernel = _explain(128, 128, 3, groups=32, padding=1)
    assert kernel.startswith("triton grouped conv (8 groups per tile)")
    assert "groups=32" in kernel and "8 groups of 4 channels per tile" in kernel and "vector access" in kernel
    assert "x [32, 32] block-diagonal" in kernel and "scalar" in _explain(128, 128, 3, groups=32, padding=1,
                                                                                   channels_last=False)
    assert _explain(256, 256, 3, groups=8, padding=1, stride=2).startswith("triton grouped conv (2 groups per tile)")


@pytest.mark.parametrize("c_in, c_out, k, groups, padding, why", [
    (64, 64, 3, 1, 1, "not conv1x1: kernel 3x3 is not 1x1; not grouped: groups=1"),
    (64, 64, 1, 1, 1, "not conv1x1: padding (1, 1) is not 0"),
    (32, 32, 3, 32, 1, "not grouped: 1 channels per group is outside 4..32"),
    (128, 128, 3, 2, 1, "not grouped: 64 channels per group is outside 4..32"),
    (64, 128, 3, 8, 1, "not grouped: 8 -> 16 channels per group differ"),
])
def test_explain_names_the_general_kernel_and_why(c_in, c_out, k, groups, padding, why):
    kernel = _explain(c_in, c_out, k, groups=groups, padding=padding)
    assert kernel.startswith("triton implicit GEMM (general)") and why in kernel


def test_forward_kernel_by_shape():
    """The choice forward launches (the interpreter tests check the launch itself)."""
    for shape, stride, padding, groups, expected in [((64, 32, 1, 1), (2, 2), (0, 0), 1, "conv1x1"),
                                                     ((64, 8, 3, 3), (1, 1), (1, 1), 8, "grouped"),
                                                     ((32, 8, 3, 3), (1, 1), (1, 1), 4, "grouped"),
                                                     ((64, 8, 3, 3), (1, 1), (1, 1), 4, "general"),
                                                     ((8, 4, 3, 3), (1, 1), (1, 1), 2, "general"),
                                                     ((64, 32, 1, 1), (3, 3), (0, 0), 1, "general")]:
        assert triton_conv_bn_act._forward_kernel(shape, stride, padding, (1, 1), groups)[0] == expected


def test_info_lists_the_kernel_choices():
    report = info.report()
    section = report[report.index("kernels picked by shape"):]
    for kernel, rule in triton_conv_bn_act.KERNEL_CHOICES:
        assert f"{kernel}: {rule}" in section
    assert [k for k, _ in triton_conv_bn_act.KERNEL_CHOICES] == [
        "triton conv1x1 GEMM + fused BN/residual/act epilogue", "triton grouped conv (G groups per tile)",
        "triton implicit GEMM (general)"]
