"""The general Triton convolution of conv_bn_act and bn_act_conv: one implicit-GEMM
kernel, its main loop written once, with the ops' differences as constexpr options:

  PROLOGUE False (conv_bn_act): A tiles are x as loaded; the epilogue is
      _conv_epilogue.conv_bn_act_epilogue (eval: act(acc*scale + shift + residual);
      training: y = acc + bias and per row tile partial statistics), scale / shift per
      output channel.
  PROLOGUE True (bn_act_conv): A tiles are act(x*scale + shift) with scale / shift per
      input channel (zero where the tap falls in the padding: the padding is zero AFTER
      the activation, as in conv2d of the activated input), rounded to x's dtype like
      the reference's z; the epilogue is _conv_epilogue.store_conv_out (+ bias).

Rows = output pixels (N*H_out*W_out), columns = output channels of one group (grid axis
2 = group), reduction over (kh, kw, C_in/groups) with tl.dot; DIRECT (C_in/groups <= 4:
depthwise, narrow groups) instead has the columns span all output channels, each
reading its own group's few inputs, with multiply-adds (tensor-core tiles would be
mostly padding). The tile tables are _conv_tiles.py's, one per op.
"""
from __future__ import annotations

import torch

from cnnkernels.triton._bn import bn_act
from cnnkernels.triton._conv_epilogue import conv_bn_act_epilogue, store_conv_out
from cnnkernels.triton._support import jit, kernel, tl, triton


@jit
def _a_tile(x_ptrs, mask, scale_ptr, shift_ptr, channels, channel_mask,
            PROLOGUE: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The A tile of x at x_ptrs (zero where not mask), in x's dtype, with the BN +
    activation prologue applied when PROLOGUE (channels [K]: its input channels)."""
    a = tl.load(x_ptrs, mask=mask, other=0.0)
    if PROLOGUE:
        scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0)
        shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0)
        a = tl.where(mask, bn_act(a, scale, shift, RELU, ACC_DTYPE), 0.0).to(a.dtype)
    return a


@kernel
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
    M, H, W, H_OUT, W_OUT, CIN_G, COUT_G, C_OUT, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    PROLOGUE: tl.constexpr, TRAINING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, DIRECT: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [N, C_in, H, W] and out [N, C_out, H_out, W_out] of any strides (channels-last
    reads coalesce), w [C_out, KH, KW, C_in/groups] contiguous. PROLOGUE: out =
    conv2d(act(x*scale + shift), w) + bias. Otherwise as conv_bn_act_epilogue says: in
    training out gets y = conv + bias, psum/pm2 [cdiv(M, BLOCK_M), C_out] the per-tile
    sum and sum of squared deviations from the tile mean; in eval out gets
    act(conv*scale + shift + residual)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n = rows // (H_OUT * W_OUT)
    hw = rows % (H_OUT * W_OUT)
    oh = hw // W_OUT
    ow = hw % W_OUT
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if DIRECT:
        co = cols
        col_mask = co < C_OUT
    else:
        co = group * COUT_G + cols
        col_mask = cols < COUT_G
    n64 = n.to(tl.int64)
    x_rows = x_ptr + n64 * sx_n
    k_taps = KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    w_cols = w_ptr + co.to(tl.int64) * (k_taps * CIN_G)
    if DIRECT:
        cin0 = (co // COUT_G) * CIN_G
        for tap in range(0, k_taps):
            ih = oh * stride_h - pad_h + (tap // KW) * dil_h
            iw = ow * stride_w - pad_w + (tap % KW) * dil_w
            in_mask = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tap = x_rows + (ih * sx_h + iw * sx_w)
            tap_mask = in_mask[:, None] & col_mask[None, :]
            for ci in range(0, CIN_G):
                cin = cin0 + ci
                a = _a_tile(x_tap[:, None] + (cin * sx_c)[None, :], tap_mask, scale_ptr, shift_ptr, cin, col_mask,
                            PROLOGUE, RELU, ACC_DTYPE)
                b = tl.load(w_cols + (tap * CIN_G + ci), mask=col_mask, other=0.0)
                acc += a.to(ACC_DTYPE) * b.to(ACC_DTYPE)[None, :]
    else:
        c_blocks = tl.cdiv(CIN_G, BLOCK_K)
        for step in range(0, k_taps * c_blocks):
            tap = step // c_blocks
            ks = (step % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = ks < CIN_G
            cin = group * CIN_G + ks
            ih = oh * stride_h - pad_h + (tap // KW) * dil_h
            iw = ow * stride_w - pad_w + (tap % KW) * dil_w
            in_mask = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = _a_tile(x_rows[:, None] + (ih * sx_h + iw * sx_w)[:, None] + (cin * sx_c)[None, :],
                        in_mask[:, None] & k_mask[None, :], scale_ptr, shift_ptr, cin, k_mask, PROLOGUE, RELU,
                        ACC_DTYPE)
            b = tl.load(w_cols[None, :] + (tap * CIN_G + ks)[:, None],
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_rows = n64 * so_n + oh * so_h + ow * so_w
    if PROLOGUE:
        store_conv_out(acc, co, col_mask, out_rows[:, None] + co[None, :] * so_c,
                       row_mask[:, None] & col_mask[None, :], bias_ptr, out_ptr, HAS_BIAS, ACC_DTYPE)
    else:
        conv_bn_act_epilogue(
            acc, pid_m, co, row_mask, col_mask, out_rows, so_c, n64 * sr_n + oh * sr_h + ow * sr_w, sr_c,
            M, C_OUT, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
            TRAINING, HAS_BIAS, HAS_RESIDUAL, RELU, ACC_DTYPE, BLOCK_M)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def launch(x, weight, bias, scale, shift, residual, out, psum, pm2, stride, padding, dilation, groups, cfg,
           acc_dtype, prologue: bool, training: bool, activation: str) -> None:
    """Runs _conv_fwd_kernel with tile config cfg (_conv_tiles) into out [N, C_out,
    H_out, W_out] (any strides). prologue (bn_act_conv): scale / shift [C_in], bias or
    None. Otherwise (conv_bn_act) scale / shift [C_out] and residual or None in eval,
    bias and psum / pm2 [cdiv(M, cfg BLOCK_M), C_out] in training."""
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    w = weight.permute(0, 2, 3, 1).contiguous()
    n, _, h_out, w_out = out.shape
    m = n * h_out * w_out
    tiles = triton.cdiv(m, cfg["BLOCK_M"])
    if cfg["DIRECT"]:
        grid = (tiles, triton.cdiv(c_out, cfg["BLOCK_N"]), 1)
    else:
        grid = (tiles, triton.cdiv(cout_g, cfg["BLOCK_N"]), groups)
    dummy = out
    _conv_fwd_kernel[grid](
        x, w, bias if bias is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, residual if residual is not None else dummy, out,
        psum if psum is not None else dummy, pm2 if pm2 is not None else dummy,
        m, x.shape[2], x.shape[3], h_out, w_out, cin_g, cout_g, c_out, kh, kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *_strides4(residual), *out.stride(),
        PROLOGUE=prologue, TRAINING=training, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=activation == "relu", ACC_DTYPE=acc_dtype, **cfg, num_warps=num_warps, num_stages=num_stages)
