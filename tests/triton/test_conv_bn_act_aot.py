"""Ahead-of-time compile of every Triton kernel of conv_bn_act's general path for sm_80
and sm_90, with no GPU: each must compile, spill no registers and fit the SM's shared
memory (machinery in tests/triton/aot.py).

The launches compiled are the ones the launchers really make: forward and backward run
on small CPU tensors shaped like the layers the general kernel takes (stem, depthwise,
narrow and wide implicit GEMMs, channels not multiples of 16), channels_last and NCHW
(aligned and unaligned specialisations), with every kernel swapped for a recorder. The 1x1 and
grouped kernels have their own tests (test_conv1x1_bn_act_aot.py,
test_grouped_conv_bn_act_aot.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from aot import CAPABILITIES, assert_fits, compile_launches, kernels_of, record_launches  # noqa: E402

from cnnkernels.triton import conv1x1_bn_act, grouped_conv_bn_act  # noqa: E402
from cnnkernels.triton import conv_bn_act as module  # noqa: E402

KERNELS = kernels_of(module)

# (c_in, c_out, kernel, stride, groups): the layer families the general launcher
# distinguishes. Together they reach every entry of conv_bn_act._conv_config's table (_conv_tiles.conv_bn_act_config).
LAYERS = [
    (3, 64, 7, 2, 1),        # stem: direct, 64 columns
    (3, 16, 3, 1, 1),        # direct, 16 columns
    (32, 32, 3, 1, 32),      # depthwise: direct
    (16, 64, 3, 1, 1),       # 16 input channels: narrow 16 x 16 tiles
    (128, 128, 3, 1, 2),     # 64 channels per group: wide, 64 columns
    (64, 256, 3, 2, 1),      # wide, 128 columns (tensor cores), stride 2
    (20, 36, 3, 1, 1),       # channels that are not multiples of 16: unaligned tiles
]
# NCHW outputs specialise the kernels differently (unaligned) from channels_last ones.
LAYOUTS = (torch.channels_last, torch.contiguous_format)
# float16 is left out: it compiles to the same tiles and resources as bfloat16.
DTYPES = ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))


def _run_layers(dtype, precision):
    saved_precision = module._dot_precision
    module._dot_precision = lambda device: precision
    try:
        for (c_in, c_out, k, stride, groups), layout in itertools.product(LAYERS, LAYOUTS):
            x = torch.randn(2, c_in, 6, 6, dtype=dtype).contiguous(memory_format=layout)
            w = torch.randn(c_out, c_in // groups, k, k, dtype=dtype)
            vec = torch.rand(c_out) + 0.5
            h_out = (6 + 2 * (k // 2) - k) // stride + 1
            residual = torch.randn(2, c_out, h_out, h_out, dtype=dtype).contiguous(memory_format=layout)
            conv = ([stride] * 2, [k // 2] * 2, [1, 1], groups)
            assert module._forward_kernel(w.shape, *conv)[0] == "general"
            for training in (True, False):
                out, conv_out, mean, var = module.forward(x, w, vec.to(dtype), vec, vec, vec, vec, *conv, training,
                                                          1e-5, residual, "relu")
                module.backward(torch.randn_like(out), out, x, w, vec.to(dtype), conv_out, vec, mean, var, *conv,
                                training, 1e-5, "relu", [False, False, False, True, True, True])
    finally:
        module._dot_precision = saved_precision


def _launches() -> list:
    launches = []
    for dtype, precision in DTYPES:
        launches += record_launches((module, conv1x1_bn_act, grouped_conv_bn_act),
                                    lambda: _run_layers(dtype, precision))
    return launches


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_launched_kernel_compiles_without_spills(capability):
    report = compile_launches(_launches(), capability)
    assert {entry.kernel for entry in report} == set(KERNELS)
    assert_fits(report, capability)
