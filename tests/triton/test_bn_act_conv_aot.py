"""Ahead-of-time compile of every Triton kernel of bn_act_conv for sm_80 and sm_90, with
no GPU: each must compile, spill no registers and fit the SM's shared memory (machinery
in tests/triton/aot.py and conv_aot.py).

The launches compiled are the ones the launchers really make: the out= form, forward and
backward run on small CPU tensors shaped like DenseNet / pre-activation ResNet /
ResNeXt / depthwise layers, x a channel-prefix view of a channels_last buffer and out a
32-channel-aligned slice of another (DenseNet's buffers; other strides compile to scalar
loads and stores, correct but slower), with every kernel swapped for a recorder.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from aot import each_capability, skip_if_interpreting  # noqa: E402
from conv_aot import DIRECT_LAYERS, assert_op_compiles  # noqa: E402

from cnnkernels.triton import bn_act_conv as module  # noqa: E402

pytestmark = skip_if_interpreting

# (c_in, c_out, kernel, stride, groups): the layer families the launcher distinguishes.
# Together they reach every entry of bn_act_conv._conv_config's table.
LAYERS = DIRECT_LAYERS + [
    (256, 256, 3, 1, 32),    # ResNeXt grouped, 8 channels per group: narrow 16 x 16 tiles
    (96, 32, 3, 1, 1),       # DenseNet 3x3 conv, growth rate 32: 32 columns
    (64, 64, 1, 1, 1),       # pre-activation bottleneck 1x1: 64 columns
    (64, 256, 3, 2, 1),      # 128 columns (tensor cores), stride 2
]


def _run_layers(dtype):
    for c_in, c_out, k, stride, groups in LAYERS:
        # A DenseNet buffer grows by 32 channels per layer: x = buf[:, :c_in] of a wider
        # buffer, out = the next 32-channel-aligned slice of another (an RGB stem input is
        # a plain channels_last tensor).
        extra = 32 if c_in % 16 == 0 else 0
        x = torch.randn(2, c_in + extra, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)[:, :c_in]
        w = torch.randn(c_out, c_in // groups, k, k, dtype=dtype)
        vec = torch.rand(c_in) + 0.5
        h_out = (6 + 2 * (k // 2) - k) // stride + 1
        out_buf = torch.empty(2, c_out + 32, h_out, h_out, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = ([stride] * 2, [k // 2] * 2, [1, 1], groups)
        for training in (True, False):
            module.into(out_buf[:, 32:], x, w, torch.randn(c_out, dtype=dtype), vec, vec, vec, vec, *conv,
                        training, 1e-5, "relu")
            out, _, _ = module.forward(x, w, None, vec, vec, vec, vec, *conv, training, 1e-5, "relu")
            module.backward(torch.randn_like(out), x, w, None, vec, vec, vec + 0.1, vec, *conv, training, 1e-5,
                            "relu", [True, False, False, True, True])


@pytest.mark.slow
@each_capability
def test_every_launched_kernel_compiles_without_spills(capability):
    assert_op_compiles(module, _run_layers, capability)
