"""BatchNorm pieces shared by the Triton backends of conv_bn_act (conv_bn_act.py: BN of
the convolution's output) and bn_act_conv (bn_act_conv.py: BN of its input): the tile
sizes and row splits of their per-channel reductions, Chan's combination of partial
statistics (merge_partials: the loop of both ops' statistics kernels), the BN +
activation both the prologue of bn_act_conv's convolution and its backward compute,
and the two backward kernels both ops launch:
  bwd_reduce_kernel     per (row split, channel) partial sums of g and g*(v - mean), v
                        the BN's input;
  bwd_finalize_kernel   sums those partials -> grad_bn_bias, grad_bn_weight.
Each op keeps its own elementwise kernels, and reads its own tensors; the flags of the
shared code say which op's formulas (unchanged from when each had its own copy) run.
"""
from __future__ import annotations

from cnnkernels.triton._support import jit, kernel, tl, triton
from cnnkernels.triton._tile import grad_before_act, tile_offsets

BLOCK_M = 64  # rows per program of the elementwise and reduction kernels
BLOCK_C = 32  # channels per program of the elementwise and reduction kernels
BLOCK_S = 16  # row splits summed at once by bwd_finalize_kernel
MAX_SPLITS = 256  # row splits of the reductions


def splits(m: int) -> tuple[int, int]:
    """(splits, rows per split) of a reduction over m rows: at most MAX_SPLITS splits of
    whole BLOCK_M row tiles, none empty."""
    count = min(triton.cdiv(m, BLOCK_M), MAX_SPLITS)
    rows_per_split = triton.cdiv(triton.cdiv(m, count), BLOCK_M) * BLOCK_M
    return triton.cdiv(m, rows_per_split), rows_per_split


@jit
def bn_act(x, scale, shift, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """act(x * scale + shift) in ACC_DTYPE, x [rows, channels], scale / shift [channels]."""
    a = x.to(ACC_DTYPE) * scale[None, :] + shift[None, :]
    if RELU:
        a = tl.maximum(a, 0.0)
    return a


@jit
def grad_before_bn_act(grad_ptr, g_offsets, x_ptr, x_offsets, scale, shift, mask,
                       RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(g, x) in ACC_DTYPE: x, and the gradient at the input of act(x * scale + shift)
    (bn_act_conv): grad_z, zeroed where x * scale + shift <= 0 for relu."""
    g = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        g = tl.where(x * scale[None, :] + shift[None, :] > 0, g, 0.0)
    return g, x


@jit
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


@jit
def merge_partials(pfirst_ptr, pm2_ptr, M, C, PARTS, PART_ROWS, cols, col_mask,
                   PART_SUMS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, biased var) [BLOCK_C] of the channels cols from [PARTS, C] partial
    statistics of PART_ROWS rows each (the last part shorter; PART_ROWS may be a
    constexpr): pfirst holds each part's sum (PART_SUMS: the row tiles of conv_bn_act's
    epilogue) or mean (the row splits of bn_act_conv), pm2 its sum of squared deviations
    from the part's mean. Chan's combination, BLOCK_P parts at a time."""
    count = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for p0 in range(0, PARTS, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        part_mask = parts < PARTS
        part_count = tl.where(part_mask, tl.minimum(M - parts * PART_ROWS, PART_ROWS), 0).to(ACC_DTYPE)
        offsets = parts.to(tl.int64)[:, None] * C + cols[None, :]
        mask = part_mask[:, None] & col_mask[None, :]
        first = tl.load(pfirst_ptr + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(pm2_ptr + offsets, mask=mask, other=0.0)
        chunk_count = tl.sum(part_count, axis=0)
        if PART_SUMS:
            chunk_mean = tl.sum(first, axis=0) / chunk_count
            part_mean = first / tl.maximum(part_count, 1.0)[:, None]
        else:
            chunk_mean = tl.sum(part_count[:, None] * first, axis=0) / chunk_count
            part_mean = first
        count, mean, m2 = chan_merge(count, mean, m2, part_count, part_mean, part_m2, chunk_count, chunk_mean, mask)
    return mean, m2 / count


@kernel
def bwd_reduce_kernel(
    grad_ptr, out_ptr, v_ptr, scale_ptr, shift_ptr, mean_ptr, pg_ptr, pgv_ptr,
    M, C, HW, W, ROWS_PER_SPLIT,
    sg_n, sg_c, sg_h, sg_w,
    so_n, so_c, so_h, so_w,
    sv_n, sv_c, sv_h, sv_w,
    HAS_V: tl.constexpr, ACT_INPUT: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For rows [split*ROWS_PER_SPLIT, ...): pg[split, c] = sum g, pgv[split, c] =
    sum g*(v - mean) (when HAS_V), v the BN's input. conv_bn_act: g = grad_out, zeroed
    where out <= 0 for relu, v = y. ACT_INPUT (bn_act_conv): g = grad_z, zeroed where
    v*scale + shift <= 0 for relu, v = x (read whatever HAS_V says)."""
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if ACT_INPUT:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    sum_g = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
    sum_gv = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
    start = split * ROWS_PER_SPLIT
    for r0 in range(start, start + ROWS_PER_SPLIT, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        g_offsets = tile_offsets(rows, cols, HW, W, sg_n, sg_c, sg_h, sg_w)
        v_offsets = tile_offsets(rows, cols, HW, W, sv_n, sv_c, sv_h, sv_w)
        if ACT_INPUT:
            g, v = grad_before_bn_act(grad_ptr, g_offsets, v_ptr, v_offsets, scale, shift, mask, RELU, ACC_DTYPE)
        else:
            g = grad_before_act(grad_ptr, g_offsets, out_ptr, tile_offsets(rows, cols, HW, W, so_n, so_c, so_h, so_w),
                                mask, RELU, ACC_DTYPE)
            if HAS_V:
                v = tl.load(v_ptr + v_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        sum_g += g
        if HAS_V:
            sum_gv += tl.where(mask, g * (v - mean[None, :]), 0.0)
    offsets = split.to(tl.int64) * C + cols
    tl.store(pg_ptr + offsets, tl.sum(sum_g, axis=0), mask=col_mask)
    if HAS_V:
        tl.store(pgv_ptr + offsets, tl.sum(sum_gv, axis=0), mask=col_mask)


@kernel
def bwd_finalize_kernel(
    pg_ptr, pgv_ptr, norm_ptr, grad_beta_ptr, grad_gamma_ptr,
    C, SPLITS, eps,
    HAS_V: tl.constexpr, INVSTD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_beta[c] = sum_s pg[s, c]; grad_gamma[c] = sum_s pgv[s, c] / sqrt(var[c] + eps)
    with var = norm (conv_bn_act), or sum_s pgv[s, c] * invstd[c] with invstd = norm
    (INVSTD: bn_act_conv)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_g = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC_DTYPE)
    sum_gv = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC_DTYPE)
    for s0 in range(0, SPLITS, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < SPLITS)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        sum_g += tl.load(pg_ptr + offsets, mask=mask, other=0.0)
        if HAS_V:
            sum_gv += tl.load(pgv_ptr + offsets, mask=mask, other=0.0)
    tl.store(grad_beta_ptr + cols, tl.sum(sum_g, axis=0), mask=col_mask)
    if HAS_V:
        if INVSTD:
            invstd = tl.load(norm_ptr + cols, mask=col_mask, other=0.0)
            tl.store(grad_gamma_ptr + cols, tl.sum(sum_gv, axis=0) * invstd, mask=col_mask)
        else:
            var = tl.load(norm_ptr + cols, mask=col_mask, other=1.0).to(ACC_DTYPE)
            tl.store(grad_gamma_ptr + cols, tl.sum(sum_gv, axis=0) / tl.sqrt(var + eps), mask=col_mask)
