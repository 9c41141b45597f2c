"""Device functions of the per-pixel, per-channel passes of every Triton backend here:
the addressing of a [rows, channels] tile of a 4-D tensor of any strides, and the
gradient at the input of an activation, read back from its output. Triton inlines them
into the kernels that call them.
"""
from __future__ import annotations

from cnnkernels.triton._support import jit, tl


@jit
def tile_offsets(rows, cols, HW, W, s_n, s_c, s_h, s_w):
    """Element offsets [BLOCK_M, BLOCK_C] of a tile of a 4-D tensor of strides (s_n, s_c,
    s_h, s_w), of any strides: rows are flattened pixels (n, h, w) with H*W = HW, cols
    channels."""
    n = (rows // HW).to(tl.int64)
    h = (rows % HW) // W
    w = rows % W
    return (n * s_n + h * s_h + w * s_w)[:, None] + cols[None, :] * s_c


@jit
def grad_before_act(grad_ptr, g_offsets, out_ptr, o_offsets, mask, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The gradient at the input of an activation whose output out is stored: grad_out
    (in ACC_DTYPE), zeroed where the relu's output out <= 0."""
    g = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        o = tl.load(out_ptr + o_offsets, mask=mask, other=0.0)
        g = tl.where(o.to(ACC_DTYPE) > 0, g, 0.0)
    return g


@jit
def program_tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(rows [BLOCK_M], cols [BLOCK_C], col_mask, mask [BLOCK_M, BLOCK_C]) of this
    program's tile of the [M, C] (pixels, channels) grid of an elementwise pass: grid
    axis 0 over row tiles, axis 1 over channel tiles."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    return rows, cols, col_mask, (rows < M)[:, None] & col_mask[None, :]


@jit
def residual_act_store(z, res_ptr, res_offsets, out_ptr, out_offsets, mask,
                       HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out = act(z + residual), rounded to out's dtype: the tail of every fused pass that
    ends in a residual add and an activation (relu keeps NaN, like torch.relu)."""
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + res_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)
    tl.store(out_ptr + out_offsets, z.to(out_ptr.dtype.element_ty), mask=mask)
