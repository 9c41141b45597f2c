"""Ahead-of-time compile of every Triton kernel of conv_bn_act's general path for sm_80
and sm_90, with no GPU: each must compile, spill no registers and fit the SM's shared
memory (machinery in tests/triton/aot.py and conv_aot.py).

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

pytest.importorskip("triton")
from aot import each_capability, skip_if_interpreting  # noqa: E402
from conv_aot import DIRECT_LAYERS, assert_op_compiles, layer  # noqa: E402

from cnnkernels.triton import conv1x1_bn_act, grouped_conv_bn_act  # noqa: E402
from cnnkernels.triton import conv_bn_act as module  # noqa: E402

pytestmark = skip_if_interpreting

# (c_in, c_out, kernel, stride, groups): the layer families the general launcher
# distinguishes. Together they reach every entry of conv_bn_act._conv_config's table (_conv_tiles.conv_bn_act_config).
LAYERS = DIRECT_LAYERS + [
    (16, 64, 3, 1, 1),       # 16 input channels: narrow 16 x 16 tiles
    (128, 128, 3, 1, 2),     # 64 channels per group: wide, 64 columns
    (64, 256, 3, 2, 1),      # wide, 128 columns (tensor cores), stride 2
    (20, 36, 3, 1, 1),       # channels that are not multiples of 16: unaligned tiles
]
# NCHW outputs specialise the kernels differently (unaligned) from channels_last ones.
LAYOUTS = (torch.channels_last, torch.contiguous_format)


def _run_layers(dtype):
    for (c_in, c_out, k, stride, groups), layout in itertools.product(LAYERS, LAYOUTS):
        x, w, vec, residual, conv = layer(c_in, c_out, k, stride, groups, dtype, layout, 6)
        assert module._forward_kernel(w.shape, *conv)[0] == "general"
        for training in (True, False):
            out, conv_out, mean, var = module.forward(x, w, vec.to(dtype), vec, vec, vec, vec, *conv, training,
                                                      1e-5, residual, "relu")
            module.backward(torch.randn_like(out), out, x, w, vec.to(dtype), conv_out, vec, mean, var, *conv,
                            training, 1e-5, "relu", [False, False, False, True, True, True])


@pytest.mark.slow
@each_capability
def test_every_launched_kernel_compiles_without_spills(capability):
    assert_op_compiles(module, _run_layers, capability, other_modules=(conv1x1_bn_act, grouped_conv_bn_act))
