"""The CUDA kernels of se_excite (csrc/cuda/se_excite_kernels.cuh), run on the CPU
through the host emulation (csrc/emulation/cuda_host_emulation.h) with the launch shapes
of csrc/cuda/se_excite.cu, and checked against cnnkernels.reference in float64.

Every output buffer is filled with NaN before the kernels run (and the harness poisons
its intermediate buffers), so an element they fail to write shows up.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from cnnkernels import reference
from emulation_build import call, load

HARNESS = "se_excite_harness.cpp"

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "se_forward": [P, P, P, P, P, P, I64, I64, I64, I64, INT, INT, INT, P, P, P, P],
    "se_backward": [P, P, P, P, P, P, P, P, I64, I64, I64, I64, INT, INT, INT, P, P, P, P, P, P],
}


@pytest.fixture(scope="module")
def lib():
    return load(HARNESS, SIGNATURES)


def _nan(*shape, dtype, like=None):
    if like is not None:
        return torch.full_like(like, float("nan"))  # keeps like's memory format
    return torch.full(shape, float("nan"), dtype=dtype)


def _rel(out, ref):
    assert not out.isnan().any(), "some elements were never written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _tol(dtype):
    return 2e-5 if dtype == torch.float32 else 1e-12


# (N, C, H, W, R, max_blocks): max_blocks < N forces the per-sample grid-stride loop, a
# small budget the elementwise grid-stride loops.
CASES = [
    (2, 8, 4, 4, 2, 1024),      # tiny: C*S < one block
    (3, 37, 5, 7, 5, 2),        # odd C and S, fewer blocks than samples
    (2, 260, 3, 3, 20, 1024),   # C > 256 threads: several reduction passes over channels
    (2, 16, 17, 17, 260, 4),    # S and R > 256 threads
    (4, 5, 1, 1, 3, 3),         # S = 1: NCHW and NHWC are the same memory
]
CASE_IDS = ["tiny", "odd", "C260", "S289R260", "S1"]


def _inputs(case, channels_last, dtype, bias, residual, seed=0):
    n, c, h, w, r, _ = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (rand(n, c, h, w) + rand(1, c, 1, 1)).contiguous(memory_format=fmt)
    w1, w2 = rand(r, c, scale=c ** -0.5), rand(c, r, scale=r ** -0.5)
    b1 = rand(r, scale=0.3) if bias else None
    b2 = rand(c, scale=0.3) if bias else None
    res = rand(n, c, h, w).contiguous(memory_format=fmt) if residual else None
    return x, w1, b1, w2, b2, res


def _double(t):
    return None if t is None else t.double()


# Every case in float64 with and without bias / residual / relu; float32 on two cases
# (the emulation runs 256 host threads per block, so the matrix is kept small).
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case,dtype", [(c, torch.float64) for c in CASES] + [(CASES[0], torch.float32),
                                                                              (CASES[1], torch.float32)],
                         ids=[f"{i}-f64" for i in CASE_IDS] + ["tiny-f32", "odd-f32"])
@pytest.mark.parametrize("activation,bias,residual", [("relu", True, True), ("none", False, False)],
                         ids=["relu-bias-res", "none"])
def test_forward_and_backward(lib, case, channels_last, dtype, activation, bias, residual):
    n, c, h, w, r, max_blocks = case
    x, w1, b1, w2, b2, res = _inputs(case, channels_last, dtype, bias, residual)
    relu = int(activation == "relu")
    out = _nan(dtype=dtype, like=x)
    squeezed, hidden, gate = _nan(n, c, dtype=dtype), _nan(n, r, dtype=dtype), _nan(n, c, dtype=dtype)
    call(lib, "se_forward", dtype, x, w1, b1, w2, b2, res, n, c, h * w, r, int(channels_last), relu, max_blocks,
         out, squeezed, hidden, gate)
    ref = reference.se_excite_forward(x.double(), w1.double(), _double(b1), w2.double(), _double(b2),
                                      _double(res), activation)
    for got, want in zip((out, squeezed, hidden, gate), ref):
        assert _rel(got, want) < _tol(dtype)

    grad_out = torch.randn(x.shape, dtype=dtype).contiguous(memory_format=x_format(x))
    grads = [_nan(dtype=dtype, like=x), _nan(r, c, dtype=dtype), _nan(r, dtype=dtype), _nan(c, r, dtype=dtype),
             _nan(c, dtype=dtype), _nan(dtype=dtype, like=x)]
    call(lib, "se_backward", dtype, grad_out, out if relu else None, x, w1, w2, squeezed, hidden, gate,
         n, c, h * w, r, int(channels_last), relu, max_blocks, *grads)
    ref_grads = reference.se_excite_backward(grad_out.double(), out.double(), x.double(), w1.double(), w2.double(),
                                             squeezed.double(), hidden.double(), gate.double(), activation,
                                             [True] * 6)
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2", "residual"), grads, ref_grads):
        assert _rel(got, want) < _tol(dtype), name


def x_format(x):
    return reference.output_memory_format(x)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("wanted", [(0,), (5,), (1, 2), (3, 4), (0, 5)], ids=["x", "res", "fc1", "fc2", "x+res"])
def test_backward_subset_of_outputs(lib, channels_last, wanted):
    """Only the wanted outputs are written (the others are null pointers)."""
    case = CASES[1]
    n, c, h, w, r, max_blocks = case
    dtype = torch.float64
    x, w1, b1, w2, b2, res = _inputs(case, channels_last, dtype, True, True, seed=1)
    fwd = reference.se_excite_forward(x, w1, b1, w2, b2, res, "relu")
    out, squeezed, hidden, gate = fwd
    grad_out = torch.randn(x.shape, dtype=dtype).contiguous(memory_format=x_format(x))
    like = [x, (r, c), (r,), (c, r), (c,), x]
    grads = [None] * 6
    for i in wanted:
        grads[i] = _nan(dtype=dtype, like=x) if i in (0, 5) else _nan(*like[i], dtype=dtype)
    call(lib, "se_backward", dtype, grad_out, out, x, w1, w2, squeezed, hidden, gate, n, c, h * w, r,
         int(channels_last), 1, max_blocks, *grads)
    ref = reference.se_excite_backward(grad_out, out, x, w1, w2, squeezed, hidden, gate, "relu", [True] * 6)
    for i in wanted:
        assert _rel(grads[i], ref[i]) < 1e-12, i


def test_gate_near_saturation(lib):
    """Large pre-activations: the gate saturates to 0 / 1 without NaN or inf."""
    n, c, h, w, r = 2, 6, 3, 3, 4
    x = torch.randn(n, c, h, w, dtype=torch.float32) + 3
    w1 = torch.randn(r, c) * 10
    w2 = torch.randn(c, r) * 10
    out = _nan(dtype=torch.float32, like=x)
    squeezed, hidden, gate = _nan(n, c, dtype=torch.float32), _nan(n, r, dtype=torch.float32), _nan(
        n, c, dtype=torch.float32)
    call(lib, "se_forward", torch.float32, x, w1, None, w2, None, None, n, c, h * w, r, 0, 0, 1024, out, squeezed,
         hidden, gate)
    ref = reference.se_excite_forward(x.double(), w1.double(), None, w2.double(), None, None, "none")
    assert torch.isfinite(gate).all()
    assert _rel(out, ref[0]) < 1e-5
