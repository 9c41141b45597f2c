"""Triton conv_bn_act forward for 1x1 convolutions (stride 1 or 2, padding 0, groups 1):
the bottleneck reduce / expand convs of ResNet, ResNeXt and GoogLeNet, run as a GEMM

    [N*H_out*W_out, C_in] x [C_in, C_out]

over output pixels, the input pixel of output (n, oh, ow) being x[n, :, oh*s, ow*s],
with the BN / residual / activation (eval) or conv_out + partial statistics (training)
work in the epilogue (cnnkernels/triton/_conv_epilogue.py). x and the weight are read
through their strides, so neither is copied: channels-last x makes the A tile rows
contiguous, NCHW x its columns. Accumulation is float32 (float64 in the interpreter).
The result is the same as the general kernel's (cnnkernels/triton/conv_bn_act.py), which
merges the statistics and runs the training normalisation pass afterwards.
"""
from __future__ import annotations

import torch

from cnnkernels.triton import _support
from cnnkernels.triton._conv_epilogue import conv_bn_act_epilogue
from cnnkernels.triton._support import kernel, tl, triton

NAME = "triton conv1x1 GEMM + fused BN/residual/act epilogue"
RULE = "1x1 kernel, stride 1 or 2, padding 0, groups 1"
_GROUP_M = 8  # row tiles that walk the column tiles together (L2 reuse of the weight tiles)


@kernel
def _conv1x1_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
    M, C_IN, C_OUT, HW_OUT, W_OUT, stride_h, stride_w,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_i,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    TRAINING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x [N, C_in, H, W] and w [C_out, C_in] (element strides sw_o, sw_i) of any strides;
    grid (cdiv(M, BLOCK_M) * cdiv(C_out, BLOCK_N),), programs ordered in bands of
    GROUP_M row tiles. Outputs as conv_bn_act_epilogue describes."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(C_OUT, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    first_m = band * GROUP_M
    band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // band_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n = (rows // HW_OUT).to(tl.int64)
    oh = (rows % HW_OUT) // W_OUT
    ow = rows % W_OUT
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = co < C_OUT
    a_rows = x_ptr + (n * sx_n + (oh * stride_h) * sx_h + (ow * stride_w) * sx_w)
    b_cols = w_ptr + co.to(tl.int64) * sw_o
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, C_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < C_IN
        a = tl.load(a_rows[:, None] + ks[None, :] * sx_c, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols[None, :] + ks[:, None] * sw_i, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    conv_bn_act_epilogue(
        acc, pid_m, co, row_mask, col_mask, n * so_n + oh * so_h + ow * so_w, so_c,
        n * sr_n + oh * sr_h + ow * sr_w, sr_c,
        M, C_OUT, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
        TRAINING, HAS_BIAS, HAS_RESIDUAL, RELU, ACC_DTYPE, BLOCK_M)


def mismatch(weight_shape, stride, padding, dilation, groups) -> str | None:
    """Why this kernel does not take a convolution (None when it does): it takes a 1x1
    kernel with stride 1 or 2 (both axes), padding 0 and groups 1 (dilation is moot)."""
    kh, kw = weight_shape[2], weight_shape[3]
    if (kh, kw) != (1, 1):
        return f"kernel {kh}x{kw} is not 1x1"
    if groups != 1:
        return f"groups={groups}"
    if any(s not in (1, 2) for s in stride):
        return f"stride {tuple(stride)} is not 1 or 2"
    if any(p != 0 for p in padding):
        return f"padding {tuple(padding)} is not 0"
    return None


def config(dtype: torch.dtype, c_in: int, c_out: int, precision: str, vector: bool) -> dict:
    """The fixed tile configuration for a [M, C_in] x [C_in, C_out] problem, no autotuning.
    vector (channels-last tensors with 16-aligned channel strides, see
    conv_bn_act._vector_io: loads and stores of contiguous channel runs vectorise):
      tensor cores (16-bit input, or float32 with a tf32 precision): BLOCK_M 128,
        BLOCK_N 64 (C_out <= 64, 4 warps) or 128 (8 warps), BLOCK_K 64 (16-bit) or 32
        (tf32: the same bytes), 3 pipeline stages (64 KiB of operands at most);
      float32 "ieee" (FMA, no tensor cores): 64 x 64 x 32, 4 warps (8 with triton < 3.8), 2 stages.
    Otherwise (NCHW data, or channel counts that are not multiples of 16) every access
    is a scalar one with its own 64-bit address, and the tiles shrink until nothing
    spills: 64 x 64 x 32 (16-bit) or x 16 (tf32) with 8 warps, "ieee" 64 x 64 x 16
    with 8 warps.
    tests/triton/test_conv1x1_bn_act_aot.py compiles every configuration this can
    return for sm_80 and sm_90."""
    tensor_cores = dtype != torch.float32 or precision != "ieee"
    half = dtype != torch.float32
    if vector and tensor_cores:
        wide = c_out > 64
        block_m, block_n, block_k, warps, stages = 128, 128 if wide else 64, 64 if half else 32, 8 if wide else 4, 3
    elif vector:  # (8 warps with triton < 3.8: 4 spill on sm_80 in training, _support.TRITON_BEFORE_3_8)
        block_m, block_n, block_k, warps, stages = 64, 64, 32, 8 if _support.TRITON_BEFORE_3_8 else 4, 2
    elif tensor_cores:
        block_m, block_n, block_k, warps, stages = 64, 64, 32 if half else 16, 8, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 64, 16, 8, 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M,
                PRECISION=precision if dtype == torch.float32 else "ieee", num_warps=warps, num_stages=stages)


def describe(dtype: torch.dtype, c_in: int, c_out: int, precision: str, vector: bool) -> str:
    """The tiles config() picks, in words."""
    cfg = config(dtype, c_in, c_out, precision, vector)
    return (f"[N*H_out*W_out, {c_in}] x [{c_in}, {c_out}] GEMM, tiles "
            f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}, {cfg['num_warps']} warps")


def launch(x, weight, bias, scale, shift, residual, out, psum, pm2, stride, cfg, acc_dtype, training, activation):
    """Runs _conv1x1_fwd_kernel with config cfg (from config()) into out [N, C_out, H_out,
    W_out] (any strides); psum / pm2 [cdiv(M, cfg BLOCK_M), C_out] in training, else None."""
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    n, c_out, h_out, w_out = out.shape
    m = n * h_out * w_out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)
    dummy = out
    _conv1x1_fwd_kernel[grid](
        x, weight, bias if bias is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, residual if residual is not None else dummy, out,
        psum if psum is not None else dummy, pm2 if pm2 is not None else dummy,
        m, x.shape[1], c_out, h_out * w_out, w_out, stride[0], stride[1],
        *x.stride(), weight.stride(0), weight.stride(1),
        *(residual.stride() if residual is not None else (0, 0, 0, 0)), *out.stride(),
        TRAINING=training, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=activation == "relu", ACC_DTYPE=acc_dtype, **cfg, num_warps=num_warps, num_stages=num_stages)
