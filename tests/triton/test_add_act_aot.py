"""Ahead-of-time compile of the Triton kernels of add_act for sm_80 and sm_90, with no
GPU: each launch the launchers make (recorded from forward / backward on small CPU
tensors, every dtype the GPU runs, relu and none) must compile, spill no registers and
fit the SM's shared memory (machinery in tests/triton/aot.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from aot import assert_kernels_compile, each_capability, kernels_of, record_launches, skip_if_interpreting  # noqa: E402

from cnnkernels.triton import add_act as module  # noqa: E402

pytestmark = skip_if_interpreting
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _run_all() -> None:
    for dtype in DTYPES:
        x = torch.randn(2, 8, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        residual = torch.randn(2, 8, 5, 7, dtype=dtype)
        for activation in ("relu", "none"):
            out = module.forward(x, residual, activation)
            module.backward(torch.randn_like(out), out, activation)


@each_capability
def test_every_launched_kernel_compiles_without_spills(capability):
    report = assert_kernels_compile(record_launches((module,), _run_all), kernels_of(module), capability)
    assert len(report) == 2 * len(DTYPES) * 2  # forward and backward x dtype x activation
