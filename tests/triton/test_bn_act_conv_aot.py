"""Ahead-of-time compile of every Triton kernel of bn_act_conv for sm_80 and sm_90, with
no GPU: each must compile, spill no registers and fit the SM's shared memory (machinery
in tests/triton/aot.py).

The launches compiled are the ones the launchers really make: the out= form, forward and
backward run on small CPU tensors shaped like DenseNet / pre-activation ResNet /
ResNeXt / depthwise layers, x a channel-prefix view of a channels_last buffer and out a
32-channel-aligned slice of another (DenseNet's buffers; other strides compile to scalar
loads and stores, correct but slower), with every kernel swapped for a recorder.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from aot import CAPABILITIES, Compiled, assert_fits, kernels_of, ptxas_usage, record_launches, unique_launches  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cnnkernels.triton import bn_act_conv as module  # noqa: E402

KERNELS = kernels_of(module)

# (c_in, c_out, kernel, stride, groups): the layer families the launcher distinguishes.
# Together they reach every entry of bn_act_conv._conv_config's table.
LAYERS = [
    (3, 64, 7, 2, 1),        # stem: direct, 64 columns
    (3, 16, 3, 1, 1),        # direct, 16 columns
    (32, 32, 3, 1, 32),      # depthwise: direct
    (256, 256, 3, 1, 32),    # ResNeXt grouped, 8 channels per group: narrow 16 x 16 tiles
    (96, 32, 3, 1, 1),       # DenseNet 3x3 conv, growth rate 32: 32 columns
    (64, 64, 1, 1, 1),       # pre-activation bottleneck 1x1: 64 columns
    (64, 256, 3, 2, 1),      # 128 columns (tensor cores), stride 2
]
# float16 is left out: it compiles to the same tiles and resources as bfloat16.
DTYPES = ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))


def _run_layers(dtype, precision):
    saved_precision = module._dot_precision
    module._dot_precision = lambda device: precision
    try:
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
    finally:
        module._dot_precision = saved_precision


def _launches() -> list:
    launches = []
    for dtype, precision in DTYPES:
        launches += record_launches((module,), lambda: _run_layers(dtype, precision))
    return launches


def _compile(launches, capability) -> list[Compiled]:
    """aot.compile_launches, except that a kernel may read global memory only through
    cp.async (the software pipeline stages every load of the convolution, scale and
    shift included, through shared memory)."""
    target = GPUTarget("cuda", capability, 32)
    report = []
    for key, (jit, signature, constexprs, attrs, options) in unique_launches(launches, capability).items():
        compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        assert "ld.global" in ptx or "cp.async" in ptx, key
        registers, stores, loads = ptxas_usage(ptx, capability)
        report.append(Compiled(key[0], key[2], key[3], key[4], compiled.metadata.shared, registers, stores, loads))
    return report


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_launched_kernel_compiles_without_spills(capability):
    report = _compile(_launches(), capability)
    assert {entry.kernel for entry in report} == set(KERNELS)
    assert_fits(report, capability)
