"""Ahead-of-time compile of every Triton kernel of se_excite for sm_80 and sm_90, with no
GPU: each must compile, spill no registers and fit the SM's shared memory (machinery in
tests/triton/aot.py).

The launches compiled are the ones the launchers really make: forward and backward run
on small CPU tensors shaped like SE-ResNet gates (every dtype the GPU path takes, NCHW
and channels_last, with and without bias / residual / relu, every subset of gradients
that changes the constexprs), with every kernel swapped for a recorder.
"""
from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")
from aot import assert_kernels_compile, each_capability, kernels_of, record_launches, skip_if_interpreting  # noqa: E402

from cnnkernels import reference  # noqa: E402
from cnnkernels.triton import se_excite as module  # noqa: E402

pytestmark = skip_if_interpreting
# (C, R, H): SE-ResNet-50 stages 1 and 4 (reduction 16), and an odd small gate.
GATES = [(256, 16, 7), (2048, 128, 3), (37, 5, 5)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# output masks of the backward: every subset of gradients that changes the constexprs
MASKS = ([True] * 6, [True, False, False, False, False, False], [False] * 5 + [True],
         [False, True, False, True, False, False], [False, False, True, False, True, False])


def _run_all() -> None:
    for dtype, (c, r, h), channels_last, bias in itertools.product(DTYPES, GATES, (False, True), (True, False)):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(2, c, h, h, dtype=dtype).contiguous(memory_format=fmt)
        w1, w2 = torch.randn(r, c, dtype=dtype), torch.randn(c, r, dtype=dtype)
        b1 = torch.randn(r, dtype=dtype) if bias else None
        b2 = torch.randn(c, dtype=dtype) if bias else None
        res = torch.randn_like(x) if bias else None
        activation = "relu" if bias else "none"
        sdtype = reference.stats_dtype(dtype)
        out = module.forward(x, w1, b1, w2, b2, res, activation)[0]
        stats = (torch.rand(2, c, dtype=sdtype), torch.rand(2, r, dtype=sdtype), torch.rand(2, c, dtype=sdtype))
        for mask in MASKS:
            module.backward(torch.randn_like(out), out, x, w1, w2, *stats, activation, mask)


@pytest.mark.slow
@each_capability
def test_every_launched_kernel_compiles_without_spills(capability):
    assert_kernels_compile(record_launches((module,), _run_all), kernels_of(module), capability)
