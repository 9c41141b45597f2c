"""Triton backend of bn_act_conv: implicit-GEMM convolution whose x-tile loads apply the
BatchNorm scale/shift and the activation (a prologue), so the normalised input
z = act(x * scale + shift) is never written to memory in the forward; plus the batch
statistics of x and the BN / activation part of the backward.

Kernels (each launched compiled on CUDA tensors, through Triton's interpreter on CPU
tensors, see cnnkernels/triton/_launch.py):
  _stats_partial_kernel  per (row split, channel): Chan-merged mean and M2 of x over the
                         split's rows, x read through its strides (a channel-prefix
                         view of a wider buffer is read in place).
  _stats_finalize_kernel Chan's combination of the splits -> mean, biased var.
  _implicit_gemm._conv_fwd_kernel  the general implicit-GEMM convolution shared with
                         conv_bn_act, with its prologue: A tiles act(x * scale + shift)
                         (zero where the tap falls in the padding), rounded to x's dtype
                         like the reference's z; tl.dot, or "direct" multiply-adds when
                         C_in/groups <= 4. Epilogue: + bias, stored through out's strides
                         (any strides: a channel slice of a bigger buffer is written in place).
  _bn_act_kernel         z = act(x * scale + shift) (the backward's recomputation).
  _bn.bwd_reduce_kernel  per (row split, channel) partial sums of g and g*(x - mean),
                         g = grad_z masked by x * scale + shift > 0 for relu.
  _bn.bwd_finalize_kernel  sums the partials -> grad_bn_bias, grad_bn_weight.
  _bn_bwd_elementwise_kernel  grad_x = g*g_scale - (x - mean)*x_scale + g_shift.
The convolution's own backward (grad_z, grad_weight, grad_bias) is
torch.ops.aten.convolution_backward on the recomputed z (cuDNN on GPU).
The kernels and pieces shared with conv_bn_act are in _bn.py (BN statistics and
backward reductions, the BN + activation), _implicit_gemm.py and _tile.py; the support
checks in _support.py.

Accumulation is float32 (float64 for float64 input, which only the interpreter runs).
float32 tl.dot runs with input_precision FP32_DOT_PRECISION on GPU ("ieee" by default,
exact like the reference; "tf32" / "tf32x3" use tensor cores); the interpreter always
computes in full precision.
"""
from __future__ import annotations

import torch

from cnnkernels import reference
from cnnkernels.triton import _bn, _conv_tiles, _implicit_gemm, _support
from cnnkernels.triton._support import kernel, tl, triton
from cnnkernels.triton._tile import program_tile, tile_offsets

FP32_DOT_PRECISION = "ieee"


# --- kernels --------------------------------------------------------------------------

@kernel
def _stats_partial_kernel(
    x_ptr, pmean_ptr, pm2_ptr,
    M, C, HW, W, ROWS_PER_SPLIT,
    sx_n, sx_c, sx_h, sx_w,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """pmean[split, c], pm2[split, c]: mean and sum of squared deviations of x[:, c] over
    rows [split*ROWS_PER_SPLIT, ...) (rows = (n, h, w)), tiles merged with Chan's formula."""
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    start = split * ROWS_PER_SPLIT
    for r0 in range(start, start + ROWS_PER_SPLIT, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + tile_offsets(rows, cols, HW, W, sx_n, sx_c, sx_h, sx_w),
                    mask=mask, other=0.0).to(ACC_DTYPE)
        tile_count = tl.maximum(tl.minimum(M - r0, BLOCK_M), 0).to(ACC_DTYPE)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        total = count + tile_count
        weight = tile_count / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        mean += delta * weight
        m2 += tile_m2 + delta * delta * (count * weight)
        count = total
    offsets = split.to(tl.int64) * C + cols
    tl.store(pmean_ptr + offsets, mean, mask=col_mask)
    tl.store(pm2_ptr + offsets, m2, mask=col_mask)


@kernel
def _stats_finalize_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, var_ptr,
    M, C, SPLITS, ROWS_PER_SPLIT,
    ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chan's combination of [SPLITS, C] (mean, M2) partials of ROWS_PER_SPLIT rows each
    (the last split shorter) -> mean[c] and biased var[c] over all M rows."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, var = _bn.merge_partials(pmean_ptr, pm2_ptr, M, C, SPLITS, ROWS_PER_SPLIT, cols, col_mask, False,
                                   ACC_DTYPE, BLOCK_S, BLOCK_C)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, var, mask=col_mask)


@kernel
def _bn_act_kernel(
    x_ptr, scale_ptr, shift_ptr, z_ptr,
    M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w,
    sz_n, sz_c, sz_h, sz_w,
    RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """z = act(x * scale + shift) over [N, C, H, W] tensors of any strides."""
    rows, cols, col_mask, mask = program_tile(M, C, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + tile_offsets(rows, cols, HW, W, sx_n, sx_c, sx_h, sx_w), mask=mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    a = _bn.bn_act(x, scale, shift, RELU, ACC_DTYPE)
    tl.store(z_ptr + tile_offsets(rows, cols, HW, W, sz_n, sz_c, sz_h, sz_w),
             a.to(z_ptr.dtype.element_ty), mask=mask)


@kernel
def _bn_bwd_elementwise_kernel(
    grad_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, g_scale_ptr, x_scale_ptr, g_shift_ptr, dx_ptr,
    M, C, HW, W,
    sg_n, sg_c, sg_h, sg_w,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_c, sd_h, sd_w,
    HAS_X: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x = g*g_scale - (x - mean)*x_scale + g_shift (the x term when HAS_X), with g
    as in _bn.bwd_reduce_kernel."""
    rows, cols, col_mask, mask = program_tile(M, C, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    g, x = _bn.grad_before_bn_act(grad_ptr, tile_offsets(rows, cols, HW, W, sg_n, sg_c, sg_h, sg_w), x_ptr,
                                  tile_offsets(rows, cols, HW, W, sx_n, sx_c, sx_h, sx_w), scale, shift, mask,
                                  RELU, ACC_DTYPE)
    dx = g * tl.load(g_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    dx += tl.load(g_shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_X:
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        dx -= (x - mean[None, :]) * tl.load(x_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    tl.store(dx_ptr + tile_offsets(rows, cols, HW, W, sd_n, sd_c, sd_h, sd_w),
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------

_acc_dtype = _support.acc_dtype


def _dot_precision(device: torch.device) -> str:
    return FP32_DOT_PRECISION if device.type == "cuda" else "ieee"


_conv_config = _conv_tiles.bn_act_conv_config  # the tile table (cnnkernels/triton/_conv_tiles.py)


def describe(x, weight, *_args) -> str:
    """The convolution kernel variant the launcher picks for this input."""
    c_out, cin_g = weight.shape[0], weight.shape[1]
    groups = x.shape[1] // cin_g
    aligned = _support.channels_last_aligned(x) and c_out % 16 == 0
    cfg = _conv_config(x.dtype, cin_g, c_out // groups, c_out, _dot_precision(x.device), aligned)
    kind = "direct multiply-add" if cfg["DIRECT"] else "tl.dot implicit GEMM"
    return (f"Triton {kind} convolution with BN/activation prologue, tiles "
            f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}" + ("" if aligned else ", unaligned access"))


def unsupported_reasons(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                        dilation, groups, training, eps, activation) -> list[str]:
    """Why the Triton backend cannot run these bn_act_conv arguments ([] when it can).

    CUDA tensors run compiled; CPU tensors run through Triton's interpreter (slow, for
    tests). float64 runs only in the interpreter."""
    if triton is None:
        return _support.missing_triton()
    reasons = _support.conv_reasons(x, weight, stride, padding, dilation)
    if not reasons:  # the backward's z, grad_z and grad_x are dense copies of x's shape
        n, _, h_out, w_out = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
        reasons = _support.index_reasons(max(n * x.shape[2] * x.shape[3], n * h_out * w_out),
                                         dict(x=x, out=(n, weight.shape[0], h_out, w_out)))
    return _support.tensor_reasons(x, activation) + reasons


def into_unsupported_reasons(out, *args) -> list[str]:
    """unsupported_reasons(*args) for bn_act_conv_into, and out's device and int32
    indexing (out is written through its strides: a channel slice spans its buffer)."""
    reasons = unsupported_reasons(*args)
    if out.device != args[0].device:
        reasons.append(f"out is on {out.device}, x on {args[0].device}")
    if triton is None or out.dim() != 4:
        return reasons
    return reasons + _support.index_reasons(out.shape[0] * out.shape[2] * out.shape[3], dict(out=out))


def _batch_stats(x):
    """Batch mean and biased variance of x [N, C, H, W] (any strides) over (N, H, W)."""
    n, c, h, w = x.shape
    m = n * h * w
    sdtype = reference.stats_dtype(x.dtype)
    acc = _acc_dtype(x.dtype)
    splits, rows_per_split = _bn.splits(m)
    pmean = torch.empty((splits, c), dtype=sdtype, device=x.device)
    pm2 = torch.empty_like(pmean)
    _stats_partial_kernel[(splits, triton.cdiv(c, _bn.BLOCK_C))](
        x, pmean, pm2, m, c, h * w, w, rows_per_split, *x.stride(),
        ACC_DTYPE=acc, BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)
    mean = torch.empty(c, dtype=sdtype, device=x.device)
    var = torch.empty_like(mean)
    _stats_finalize_kernel[(triton.cdiv(c, _bn.BLOCK_C),)](
        pmean, pm2, mean, var, m, c, splits, rows_per_split, ACC_DTYPE=acc, BLOCK_S=_bn.BLOCK_S, BLOCK_C=_bn.BLOCK_C)
    return mean, var


def _statistics(x, running_mean, running_var, training):
    if training:
        return _batch_stats(x)
    sdtype = reference.stats_dtype(x.dtype)
    return running_mean.to(sdtype).clone(), running_var.to(sdtype).clone()


def _scale_shift(x, bn_weight, bn_bias, mean, var, eps):
    """The op's per-channel scale and shift (reference formula), contiguous, statistics dtype."""
    scale, shift = reference._bn_scale_shift(bn_weight, bn_bias, mean, var, eps, x.shape[1],
                                             reference.stats_dtype(x.dtype), x.device)
    return scale.contiguous(), shift.contiguous()


def _conv(x, weight, bias, scale, shift, out, stride, padding, dilation, groups, activation):
    """out ([N, C_out, H_out, W_out], any strides) = conv2d(act(x * scale + shift), weight) + bias,
    by the general implicit-GEMM kernel with its BN + activation prologue (_implicit_gemm.py)."""
    c_out, cin_g = weight.shape[0], weight.shape[1]
    aligned = _support.channels_last_aligned(x) and _support.channels_last_aligned(out)
    cfg = _conv_config(x.dtype, cin_g, c_out // groups, c_out, _dot_precision(x.device), aligned)
    _implicit_gemm.launch(x, weight, bias, scale, shift, None, out, None, None, stride, padding, dilation, groups,
                          cfg, _acc_dtype(x.dtype), prologue=True, training=False, activation=activation)


def into(out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
         groups, training, eps, activation):
    """bn_act_conv_into; arguments and results exactly as reference.bn_act_conv_into:
    writes conv2d(act(bn(x)), weight) + bias into out ([N, C_out, H_out, W_out], any
    strides, e.g. a channel slice of a bigger buffer; no other element is touched) and
    returns save_mean, save_var [C_in] (statistics dtype). x is read through its strides;
    z = act(bn(x)) is formed in registers while loading x tiles, never stored."""
    mean, var = _statistics(x, running_mean, running_var, training)
    scale, shift = _scale_shift(x, bn_weight, bn_bias, mean, var, eps)
    _conv(x, weight, bias, scale, shift, out, stride, padding, dilation, groups, activation)
    return mean, var


def forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
            groups, training, eps, activation):
    """bn_act_conv forward; arguments and results exactly as reference.bn_act_conv_forward:
    out [N, C_out, H_out, W_out] (x's dtype, reference.bn_act_conv_memory_format(x)),
    save_mean, save_var [C_in]."""
    shape = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=reference.bn_act_conv_memory_format(x))
    mean, var = into(out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                     dilation, groups, training, eps, activation)
    return out, mean, var


def backward(grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var, stride, padding, dilation,
             groups, training, eps, activation, output_mask):
    """bn_act_conv backward; arguments and results exactly as reference.bn_act_conv_backward.

    Recomputes z = act(x * scale + shift) with _bn_act_kernel, takes grad_z, grad_weight,
    grad_bias from torch.ops.aten.convolution_backward (cuDNN on GPU), then the BN /
    activation backward in Triton: per-channel sums of g and g*xhat, and grad_x in one
    elementwise pass over grad_z and x."""
    fmt = reference.bn_act_conv_memory_format(x)
    sdtype = reference.stats_dtype(x.dtype)
    acc = _acc_dtype(x.dtype)
    relu = activation == "relu"
    n, c, h, w = x.shape
    m = n * h * w
    c_out = weight.shape[0]
    mean = save_mean.to(sdtype).contiguous()
    invstd = torch.rsqrt(save_var.to(sdtype) + eps).contiguous()
    scale, shift = _scale_shift(x, bn_weight, bn_bias, save_mean, save_var, eps)
    elementwise_grid = (triton.cdiv(m, _bn.BLOCK_M), triton.cdiv(c, _bn.BLOCK_C))

    want_grad_z = output_mask[0] or output_mask[3] or output_mask[4]
    want_bias = bool(output_mask[2]) and bias is not None
    empty_x, empty_s = x.new_empty(0), torch.empty(0, dtype=sdtype, device=x.device)
    grad_z, grad_w, grad_b = None, empty_x, empty_x
    if want_grad_z or output_mask[1] or want_bias:
        z = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        _bn_act_kernel[elementwise_grid](
            x, scale, shift, z, m, c, h * w, w, *x.stride(), *z.stride(),
            RELU=relu, ACC_DTYPE=acc, BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)
        gz, gw, gb = torch.ops.aten.convolution_backward(
            grad_out.to(x.dtype), z, weight, [c_out] if bias is not None else None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [want_grad_z, bool(output_mask[1]), want_bias])
        grad_z = gz if want_grad_z else None
        grad_w = reference.like_weight(gw, weight) if output_mask[1] else empty_x
        grad_b = gb.contiguous() if want_bias else empty_x

    x_term = training and output_mask[0]
    grad_beta = grad_gamma = None
    if output_mask[3] or output_mask[4] or x_term:
        want_x = bool(output_mask[3]) or x_term
        splits, rows_per_split = _bn.splits(m)
        pg = torch.empty((splits, c), dtype=sdtype, device=x.device)
        pgx = torch.empty_like(pg) if want_x else pg
        _bn.bwd_reduce_kernel[(splits, triton.cdiv(c, _bn.BLOCK_C))](
            grad_z, x, x, scale, shift, mean, pg, pgx, m, c, h * w, w, rows_per_split,
            *grad_z.stride(), *x.stride(), *x.stride(),
            HAS_V=want_x, ACT_INPUT=True, RELU=relu, ACC_DTYPE=acc, BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)
        grad_beta = torch.empty(c, dtype=sdtype, device=x.device)
        grad_gamma = torch.empty_like(grad_beta) if want_x else None
        _bn.bwd_finalize_kernel[(triton.cdiv(c, _bn.BLOCK_C),)](
            pg, pgx, invstd, grad_beta, grad_gamma if want_x else grad_beta, c, splits, eps,
            HAS_V=want_x, INVSTD=True, ACC_DTYPE=acc, BLOCK_S=_bn.BLOCK_S, BLOCK_C=_bn.BLOCK_C)

    grad_x = empty_x
    if output_mask[0]:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        gamma = bn_weight.to(sdtype) if bn_weight is not None else torch.ones(c, dtype=sdtype, device=x.device)
        g_scale = (gamma * invstd).contiguous()
        if training:
            x_scale = (g_scale * invstd * grad_gamma / m).contiguous()
            g_shift = (-g_scale * grad_beta / m).contiguous()
        else:
            x_scale, g_shift = g_scale, torch.zeros_like(g_scale)
        _bn_bwd_elementwise_kernel[elementwise_grid](
            grad_z, x, scale, shift, mean, g_scale, x_scale, g_shift, grad_x, m, c, h * w, w,
            *grad_z.stride(), *x.stride(), *grad_x.stride(),
            HAS_X=training, RELU=relu, ACC_DTYPE=acc, BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)
    return (grad_x, grad_w, grad_b,
            grad_gamma if output_mask[3] else empty_s,
            grad_beta if output_mask[4] else empty_s)
