"""The epilogues of the Triton convolution kernels: what becomes of one [BLOCK_M,
BLOCK_N] tile of convolution sums, rows = output pixels, columns = output channels.
conv_bn_act_epilogue is that of every conv_bn_act forward kernel (general implicit
GEMM, 1x1 GEMM, grouped), store_conv_out (+ bias) that of bn_act_conv. Imported by the
kernel files, so the BN / residual / activation / statistics code exists once; Triton
inlines it.
"""
from __future__ import annotations

from cnnkernels.triton._support import jit, tl
from cnnkernels.triton._tile import residual_act_store


@jit
def store_conv_out(acc, co, col_mask, out_offsets, mask, bias_ptr, out_ptr,
                   HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out = acc + bias[co], rounded to out's dtype (bn_act_conv's whole epilogue, and
    the first half of conv_bn_act's training one); returns the tile as stored."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=col_mask, other=0.0).to(ACC_DTYPE)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offsets, y, mask=mask)
    return y


@jit
def conv_bn_act_epilogue(
    acc, pid_m, co, row_mask, col_mask, out_rows, so_c, res_rows, sr_c,
    M, C_OUT, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
    TRAINING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] (ACC_DTYPE) holds the convolution of the row tile pid_m
    (rows pid_m*BLOCK_M + i, valid where row_mask) for channels co [BLOCK_N] (valid
    where col_mask). out_rows / res_rows [BLOCK_M] are the element offsets of each row's
    pixel in out / residual, so_c / sr_c their channel strides.

    Training: out = y = acc + bias (in out's dtype), and psum / pm2 [tiles, C_OUT] at
    [pid_m, co] get the tile's sum of y and its sum of squared deviations from the tile
    mean, over the values actually stored (what the reference's statistics see).
    Eval: out = act(acc*scale[co] + shift[co] + residual).
    """
    out_offsets = out_rows[:, None] + co[None, :] * so_c
    mask = row_mask[:, None] & col_mask[None, :]
    if TRAINING:
        y = store_conv_out(acc, co, col_mask, out_offsets, mask, bias_ptr, out_ptr, HAS_BIAS, ACC_DTYPE)
        y = tl.where(row_mask[:, None], y.to(ACC_DTYPE), 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC_DTYPE)
        tile_sum = tl.sum(y, axis=0)
        deviation = tl.where(row_mask[:, None], y - (tile_sum / count)[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        stat_offsets = pid_m.to(tl.int64) * C_OUT + co
        tl.store(psum_ptr + stat_offsets, tile_sum, mask=col_mask)
        tl.store(pm2_ptr + stat_offsets, tile_m2, mask=col_mask)
    else:
        scale = tl.load(scale_ptr + co, mask=col_mask, other=0.0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + co, mask=col_mask, other=0.0).to(ACC_DTYPE)
        residual_act_store(acc * scale[None, :] + shift[None, :], res_ptr, res_rows[:, None] + co[None, :] * sr_c,
                           out_ptr, out_offsets, mask, HAS_RESIDUAL, RELU, ACC_DTYPE)
