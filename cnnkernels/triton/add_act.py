"""Triton backend of add_act: out = act(x + residual) and its backward.

Kernels (each launched compiled on CUDA tensors, through Triton's interpreter on CPU
tensors, see cnnkernels/triton/_launch.py):
  _add_act_fwd_kernel  out = act(x + residual) over a flat range of elements
  _add_act_bwd_kernel  grad = grad_out * (out > 0) (relu) / grad_out (none)
The launchers make every tensor dense in the output's memory format
(reference.output_memory_format: x's for the forward, out's for the backward; an
input in another layout is copied), so both kernels walk one flat index with
BLOCK-element programs and a tail mask. The sum is formed in float32 (float64 for
float64 input, which only the interpreter runs) and rounded once.
"""
from __future__ import annotations

import torch

from cnnkernels import reference
from cnnkernels.triton import _support
from cnnkernels.triton._support import kernel, tl, triton

BLOCK = 1024  # elements per program
NUM_WARPS = 4  # 8 elements per thread: two 16-byte loads per input for float32


# --- kernels --------------------------------------------------------------------------

@kernel
def _add_act_fwd_kernel(x_ptr, res_ptr, out_ptr, numel, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out[i] = act(x[i] + res[i]) for i < numel; all three dense in one layout."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE) + \
        tl.load(res_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offsets, z.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def _add_act_bwd_kernel(grad_out_ptr, out_ptr, grad_ptr, numel, RELU: tl.constexpr, BLOCK: tl.constexpr):
    """grad[i] = grad_out[i] * (out[i] > 0) (RELU) or grad_out[i]; all dense in one layout."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0)
    if RELU:
        o = tl.load(out_ptr + offsets, mask=mask, other=0.0)
        g = tl.where(o > 0.0, g, 0.0)
    tl.store(grad_ptr + offsets, g.to(grad_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------

_acc_dtype = _support.acc_dtype


def unsupported_reasons(first, second, activation) -> list[str]:
    """Why the Triton backend cannot run add_act(x, residual, activation) or
    add_act_backward(grad_out, out, activation) on these arguments ([] when it can).

    CUDA tensors run compiled; CPU tensors run through Triton's interpreter (slow, for
    tests). float64 runs only in the interpreter."""
    if triton is None:
        return _support.missing_triton()
    reasons = _support.tensor_reasons(first, activation)
    if first.numel() > _support.INT32_MAX * BLOCK:  # programs index in int64; the grid axis is the limit
        reasons.append(f"{first.numel()} elements need more than the {_support.INT32_MAX} programs of one grid "
                       f"axis ({BLOCK} elements each)")
    return reasons


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=fmt)


def forward(x, residual, activation):
    """add_act forward; arguments and result exactly as reference.add_act_forward."""
    fmt = reference.output_memory_format(x)
    x, residual = _dense(x, fmt), _dense(residual, fmt)
    out = torch.empty_like(x, memory_format=fmt)
    numel = out.numel()
    if numel:
        _add_act_fwd_kernel[(triton.cdiv(numel, BLOCK),)](
            x, residual, out, numel, RELU=activation == "relu", ACC_DTYPE=_acc_dtype(x.dtype), BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return out


def backward(grad_out, out, activation):
    """add_act backward; arguments and result exactly as reference.add_act_backward."""
    fmt = reference.output_memory_format(out)
    out, grad_out = _dense(out, fmt), _dense(grad_out.to(out.dtype), fmt)
    grad = torch.empty_like(out, memory_format=fmt)
    numel = grad.numel()
    if numel:
        _add_act_bwd_kernel[(triton.cdiv(numel, BLOCK),)](
            grad_out, out, grad, numel, RELU=activation == "relu", BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad
