"""BatchNorm pieces shared by the Triton backends of conv_bn_act (conv_bn_act.py) and
bn_act_conv (bn_act_conv.py): the tile sizes and row splits of their per-channel
reductions, the addressing of their [rows, channels] tiles, Chan's combination of
partial statistics, and the sum over row splits that finalizes the backward reduction
(plus the relu-masked gradient both backward kernels of conv_bn_act start from).
Besides the constants and splits(), device functions only: Triton inlines them into the
op's kernels, which stay in the op's file and are launched from there; each op reads its
own tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK_M = 64  # rows per program of the elementwise and reduction kernels
BLOCK_C = 32  # channels per program of the elementwise and reduction kernels
MAX_SPLITS = 256  # row splits of the reductions


def splits(m: int) -> tuple[int, int]:
    """(splits, rows per split) of a reduction over m rows: at most MAX_SPLITS splits of
    whole BLOCK_M row tiles, none empty."""
    count = min(triton.cdiv(m, BLOCK_M), MAX_SPLITS)
    rows_per_split = triton.cdiv(triton.cdiv(m, count), BLOCK_M) * BLOCK_M
    return triton.cdiv(m, rows_per_split), rows_per_split


@triton.jit
def tile_offsets(rows, cols, HW, W, s_n, s_c, s_h, s_w):
    """Element offsets [BLOCK_M, BLOCK_C] of a tile of a 4-D tensor of strides (s_n, s_c,
    s_h, s_w), of any strides: rows are flattened pixels (n, h, w) with H*W = HW, cols
    channels. What every per-channel pass of the two ops addresses its tensors with."""
    n = (rows // HW).to(tl.int64)
    h = (rows % HW) // W
    w = rows % W
    return (n * s_n + h * s_h + w * s_w)[:, None] + cols[None, :] * s_c


@triton.jit
def grad_before_act(grad_ptr, g_offsets, out_ptr, o_offsets, mask, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The gradient at the input of an activation that follows the BN (conv_bn_act):
    grad_out (in ACC_DTYPE), zeroed where the relu's output out <= 0."""
    g = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        o = tl.load(out_ptr + o_offsets, mask=mask, other=0.0)
        g = tl.where(o.to(ACC_DTYPE) > 0, g, 0.0)
    return g


@triton.jit
def chan_merge(count, mean, m2, part_count, part_mean, part_m2, chunk_count, chunk_mean, mask):
    """Chan's parallel combination: folds a chunk of T partial statistics (part_count [T],
    part_mean / part_m2 [T, C], zero-count rows masked out by mask [T, C]) with their
    pooled count chunk_count and mean chunk_mean [C] into the running (count, mean, m2)
    [C]; returns the new (count, mean, m2)."""
    spread = tl.where(mask, part_mean - chunk_mean[None, :], 0.0)
    chunk_m2 = tl.sum(part_m2 + part_count[:, None] * spread * spread, axis=0)
    total = count + chunk_count
    delta = chunk_mean - mean
    mean += delta * (chunk_count / total)
    m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
    return total, mean, m2


@triton.jit
def split_sums(pg_ptr, pgv_ptr, C, SPLITS, cols, col_mask,
               HAS_V: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(sum_s pg[s, cols], sum_s pgv[s, cols]) of [SPLITS, C] backward partials (the
    second only when HAS_V, else zeros)."""
    sum_g = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC_DTYPE)
    sum_gv = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC_DTYPE)
    for s0 in range(0, SPLITS, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < SPLITS)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        sum_g += tl.load(pg_ptr + offsets, mask=mask, other=0.0)
        if HAS_V:
            sum_gv += tl.load(pgv_ptr + offsets, mask=mask, other=0.0)
    return tl.sum(sum_g, axis=0), tl.sum(sum_gv, axis=0)
