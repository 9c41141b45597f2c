"""The CUDA kernels of add_act (csrc/cuda/add_act_kernels.cuh), run on the CPU through
the host emulation (csrc/emulation/cuda_host_emulation.h, harness add_act_harness.cpp
built by emulation_build.py) and checked against plain torch in float64; and the same
source compiled by nvcc for sm_80 / sm_90 in every dtype, without spills.

Every output buffer is filled with NaN before the kernels run, so an element they fail
to write shows up.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

import emulation_build
from nvcc import ARCH_STD, EVERY_DTYPE, compile_kernels

HARNESS = "add_act_harness.cpp"
P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "add_act_forward": [P, P, I64, INT, INT, P],
    "add_act_backward": [P, P, I64, INT, INT, P],
}
THREADS, UNROLL = 256, 4  # add_act_cuda::kThreads, kUnroll

# (numel, max_blocks): sizes around the 1024-element tile of a block, and small
# max_blocks to force the grid-stride loop (several steps, then a partial tile).
CASES = [
    (1, 1024), (255, 1024), (1023, 1024), (1024, 1024), (1025, 1024),
    (5 * 7 * 9 * 2, 1024), (3 * 1024 + 1, 1), (10_000, 3), (40_003, 8),
]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def lib():
    return emulation_build.load(HARNESS, SIGNATURES)


def _poisoned(numel, dtype):
    return torch.full((numel,), float("nan"), dtype=dtype)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "some elements were never written"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "none"])
@pytest.mark.parametrize("numel,max_blocks", CASES, ids=[f"{n}el_{b}blk" for n, b in CASES])
def test_forward(lib, numel, max_blocks, relu, dtype):
    x, residual = torch.randn(numel, dtype=dtype), torch.randn(numel, dtype=dtype)
    out = _poisoned(numel, dtype)
    emulation_build.call(lib, "add_act_forward", dtype, x, residual, numel, int(relu), max_blocks, out)
    ref = x.double() + residual.double()
    if relu:
        ref = ref.relu()
    assert _rel(out, ref) < (1e-7 if dtype == torch.float32 else 1e-15)
    # A correctly rounded sum in the data's own type is exactly what torch computes.
    assert torch.equal(out, (x + residual).relu() if relu else x + residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "none"])
@pytest.mark.parametrize("numel,max_blocks", CASES, ids=[f"{n}el_{b}blk" for n, b in CASES])
def test_backward(lib, numel, max_blocks, relu, dtype):
    grad_out = torch.randn(numel, dtype=dtype)
    out = torch.randn(numel, dtype=dtype).relu()  # zeros where relu clipped: their gradient is 0
    grad = _poisoned(numel, dtype)
    emulation_build.call(lib, "add_act_backward", dtype, grad_out, out, numel, int(relu), max_blocks, grad)
    ref = torch.where(out > 0, grad_out, torch.zeros_like(grad_out)) if relu else grad_out
    assert not grad.isnan().any()
    assert torch.equal(grad, ref)


def test_forward_in_place(lib):
    """out may alias x (documented in the kernel)."""
    numel = 3 * THREADS * UNROLL + 17
    x, residual = torch.randn(numel), torch.randn(numel)
    ref = (x.double() + residual.double()).relu()
    emulation_build.call(lib, "add_act_forward", torch.float32, x, residual, numel, 1, 2, x)
    assert _rel(x, ref) < 1e-7


def test_relu_keeps_nan(lib):
    x = torch.tensor([float("nan"), -1.0, 2.0, float("-inf")])
    out = torch.zeros(4)
    emulation_build.call(lib, "add_act_forward", torch.float32, x, torch.zeros(4), 4, 1, 1024, out)
    assert out[0].isnan() and out[1:].tolist() == [0.0, 2.0, 0.0]


TRANSLATION_UNIT = r"""
#include "cuda/add_act_kernels.cuh"

namespace k = cnnkernels::add_act_cuda;

#define INSTANTIATE(T, A)                                                                          \
  template __global__ void k::add_act_forward_kernel<T, A>(const T*, const T*, int64_t, bool, T*); \
  template __global__ void k::add_act_backward_kernel<T, A>(const T*, const T*, int64_t, bool, T*);
""" + EVERY_DTYPE


@pytest.mark.parametrize("arch,std", ARCH_STD)
def test_kernels_compile_with_nvcc(arch, std, tmp_path):
    assert len(compile_kernels(TRANSLATION_UNIT, arch, std, tmp_path)) == 8
