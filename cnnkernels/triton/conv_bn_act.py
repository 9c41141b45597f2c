"""Triton backend of conv_bn_act: implicit-GEMM convolution with a fused BatchNorm /
residual / activation epilogue, and the BN / activation part of the backward.

The convolution forward runs one of three kernels, picked by shape (_forward_kernel,
named with the reason by kernel_name(), shown by cnnkernels.ops.explain and
python -m cnnkernels.info):
  conv1x1_bn_act.py      1x1, stride 1 or 2, padding 0, groups 1: a GEMM over output
                         pixels (ResNet / ResNeXt / GoogLeNet reduce and expand convs);
  grouped_conv_bn_act.py ResNeXt grouped 3x3 (4..32 channels per group): several groups
                         per tile through block-diagonal weight tiles;
  _implicit_gemm.py      everything else: the general implicit GEMM, shared with
                         bn_act_conv (or direct multiply-adds for depthwise and other
                         <= 4 channels-per-group convolutions).
All three share the fused epilogue of _conv_epilogue.py (eval: act(acc*scale + shift +
residual) -> out; training: y = acc + bias -> conv_out, and per (row tile, channel)
sum/M2 partial statistics), so the statistics merge and normalisation passes and the
backward below are common to them.

Kernels (each launched compiled on CUDA tensors, through Triton's interpreter on CPU
tensors, see cnnkernels/triton/_launch.py), besides the forward convolution:
  _bn_stats_kernel       Chan's parallel combination of the partials -> mean, biased var,
                         and the per-channel scale/shift of the normalisation.
  _bn_act_fwd_kernel     out = act(y*scale + shift + residual) (training).
  _bn.bwd_reduce_kernel  per (row split, channel) partial sums of g and g*(y - mean),
                         g = grad_out masked by out > 0 for relu.
  _bn.bwd_finalize_kernel  sums the partials -> grad_bn_bias, grad_bn_weight.
  _bn_bwd_elementwise_kernel  grad_y (input of the convolution's backward) and
                         grad_residual in one pass.
The convolution's own backward (grad_x, grad_weight, grad_bias) is
torch.ops.aten.convolution_backward (cuDNN on GPU).
The kernels and pieces shared with bn_act_conv are in _bn.py (BN statistics and
backward reductions), _implicit_gemm.py and _tile.py; the support checks in _support.py.

Accumulation is float32 (float64 for float64 input, which only the interpreter runs).
float32 tl.dot runs with input_precision FP32_DOT_PRECISION on GPU ("ieee" by default,
exact like the reference; set it to "tf32" or "tf32x3" for tensor cores); the
interpreter always computes in full precision.
"""
from __future__ import annotations

import torch

from cnnkernels import reference
from cnnkernels.triton import _bn, _conv_tiles, _implicit_gemm, _support
from cnnkernels.triton import conv1x1_bn_act, grouped_conv_bn_act
from cnnkernels.triton._support import kernel, tl, triton
from cnnkernels.triton._tile import grad_before_act, program_tile, residual_act_store, tile_offsets

FP32_DOT_PRECISION = "ieee"
_STATS_BLOCK_T = 64  # partial statistics of row tiles combined at once


# --- kernels --------------------------------------------------------------------------

@kernel
def _bn_stats_kernel(
    psum_ptr, pm2_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr,
    M, C, TILES, eps,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TILE_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Combines [TILES, C] partial (sum, M2) of row tiles of TILE_M rows (the last one
    shorter) into mean, biased var, scale = gamma/sqrt(var+eps), shift = beta - mean*scale."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, var = _bn.merge_partials(psum_ptr, pm2_ptr, M, C, TILES, TILE_M, cols, col_mask, True, ACC_DTYPE, BLOCK_T,
                                   BLOCK_C)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, var, mask=col_mask)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    shift = -mean * scale
    if HAS_BETA:
        shift += tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    tl.store(scale_ptr + cols, scale, mask=col_mask)
    tl.store(shift_ptr + cols, shift, mask=col_mask)


@kernel
def _bn_act_fwd_kernel(
    y_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    M, C, HW, W,
    sy_n, sy_c, sy_h, sy_w,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act(y*scale + shift + residual) over [N, C, H, W] tensors of any strides."""
    rows, cols, col_mask, mask = program_tile(M, C, BLOCK_M, BLOCK_C)
    y = tl.load(y_ptr + tile_offsets(rows, cols, HW, W, sy_n, sy_c, sy_h, sy_w), mask=mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    residual_act_store(y.to(ACC_DTYPE) * scale[None, :] + shift[None, :],
                       res_ptr, tile_offsets(rows, cols, HW, W, sr_n, sr_c, sr_h, sr_w),
                       out_ptr, tile_offsets(rows, cols, HW, W, so_n, so_c, so_h, so_w), mask,
                       HAS_RESIDUAL, RELU, ACC_DTYPE)


@kernel
def _bn_bwd_elementwise_kernel(
    grad_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gxhat_ptr,
    dy_ptr, gres_ptr,
    M, C, HW, W, eps,
    sg_n, sg_c, sg_h, sg_w,
    so_n, so_c, so_h, so_w,
    sy_n, sy_c, sy_h, sy_w,
    sd_n, sd_c, sd_h, sd_w,
    se_n, se_c, se_h, se_w,
    TRAINING: tl.constexpr, HAS_GAMMA: tl.constexpr, RELU: tl.constexpr,
    WRITE_DY: tl.constexpr, WRITE_GRES: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """g = grad_out (masked by out > 0 for relu); grad_residual = g;
    grad_y = gamma*invstd * (g - sum_g/M - xhat*sum_gxhat/M) in training, else
    gamma*invstd*g, with xhat = (y - mean)*invstd."""
    rows, cols, col_mask, mask = program_tile(M, C, BLOCK_M, BLOCK_C)
    g = grad_before_act(grad_ptr, tile_offsets(rows, cols, HW, W, sg_n, sg_c, sg_h, sg_w), out_ptr,
                            tile_offsets(rows, cols, HW, W, so_n, so_c, so_h, so_w), mask, RELU, ACC_DTYPE)
    if WRITE_GRES:
        tl.store(gres_ptr + tile_offsets(rows, cols, HW, W, se_n, se_c, se_h, se_w),
                 g.to(gres_ptr.dtype.element_ty), mask=mask)
    if WRITE_DY:
        invstd = 1.0 / tl.sqrt(tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(ACC_DTYPE) + eps)
        k = invstd
        if HAS_GAMMA:
            k = k * tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
        if TRAINING:
            mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
            mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE) / M
            mean_gxhat = tl.load(sum_gxhat_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE) / M
            y = tl.load(y_ptr + tile_offsets(rows, cols, HW, W, sy_n, sy_c, sy_h, sy_w),
                        mask=mask, other=0.0).to(ACC_DTYPE)
            xhat = (y - mean[None, :]) * invstd[None, :]
            g = g - mean_g[None, :] - xhat * mean_gxhat[None, :]
        tl.store(dy_ptr + tile_offsets(rows, cols, HW, W, sd_n, sd_c, sd_h, sd_w),
                 (g * k[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------

_acc_dtype = _support.acc_dtype


def _dot_precision(device: torch.device) -> str:
    return FP32_DOT_PRECISION if device.type == "cuda" else "ieee"


_conv_config = _conv_tiles.conv_bn_act_config  # the tile table (cnnkernels/triton/_conv_tiles.py)


def unsupported_reasons(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                        dilation, groups, training, eps, residual, activation) -> list[str]:
    """Why the Triton backend cannot run these conv_bn_act arguments ([] when it can).

    CUDA tensors run compiled; CPU tensors run through Triton's interpreter (slow, for
    tests). float64 runs only in the interpreter."""
    if triton is None:
        return _support.missing_triton()
    reasons = _support.conv_reasons(x, weight, stride, padding, dilation)
    if not reasons:
        out_shape = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
        reasons = _support.index_reasons(out_shape[0] * out_shape[2] * out_shape[3],
                                         dict(x=x, weight=weight, residual=residual, out=out_shape))
    return _support.tensor_reasons(x, activation) + reasons


def backward_unsupported_reasons(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, stride,
                                 padding, dilation, groups, training, eps, activation, output_mask) -> list[str]:
    """unsupported_reasons for the backward's arguments: the forward's checks, and the
    int32 indexing of the tensors the backward kernels read."""
    reasons = unsupported_reasons(x, weight, bias, bn_weight, None, None, None, stride, padding, dilation, groups,
                                  training, eps, None, activation)
    if triton is None or grad_out.dim() != 4:
        return reasons
    n, _, h_out, w_out = grad_out.shape
    return reasons + _support.index_reasons(n * h_out * w_out, dict(grad_out=grad_out, out=out, conv_out=conv_out))


def forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
            groups, training, eps, residual, activation):
    """conv_bn_act forward; arguments and results exactly as reference.conv_bn_act_forward.

    x [N, C_in, H, W] (the general kernel first converts a contiguous NCHW x to
    channels-last, so its reduction reads are contiguous in C; the 1x1 and grouped
    kernels read x through its strides); weight [C_out, C_in/groups, kH, kW];
    bias, bn_* [C_out] or None; residual [N, C_out, H_out, W_out] or None.
    Returns out [N, C_out, H_out, W_out] (x's dtype, reference.output_memory_format(x)),
    conv_out (training: conv + bias, same shape and format; eval: empty [0]),
    save_mean, save_var [C_out] (statistics dtype: batch mean and biased variance in
    training, copies of the running statistics in eval).
    """
    fmt = reference.output_memory_format(x)
    sdtype = reference.stats_dtype(x.dtype)
    n, c_out, h_out, w_out = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    conv_args = dict(x=x, weight=weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if not training:
        invstd = torch.rsqrt(running_var.to(sdtype) + eps)
        scale = invstd * bn_weight.to(sdtype) if bn_weight is not None else invstd
        shift = -running_mean.to(sdtype) * scale
        if bias is not None:
            shift = shift + bias.to(sdtype) * scale
        if bn_bias is not None:
            shift = shift + bn_bias.to(sdtype)
        _conv(**conv_args, bias=None, scale=scale.contiguous(), shift=shift.contiguous(), residual=residual,
              out=out, training=False, activation=activation)
        return out, x.new_empty(0), running_mean.to(sdtype).clone(), running_var.to(sdtype).clone()

    y = torch.empty_like(out)
    psum, pm2, tile_m = _conv(**conv_args, bias=bias, scale=None, shift=None, residual=None, out=y,
                              training=True, activation=activation)
    m = n * h_out * w_out
    save_mean = torch.empty(c_out, dtype=sdtype, device=x.device)
    save_var = torch.empty_like(save_mean)
    scale = torch.empty_like(save_mean)
    shift = torch.empty_like(save_mean)
    acc = _acc_dtype(x.dtype)
    _bn_stats_kernel[(triton.cdiv(c_out, _bn.BLOCK_C),)](
        psum, pm2, bn_weight if bn_weight is not None else scale, bn_bias if bn_bias is not None else scale,
        save_mean, save_var, scale, shift, m, c_out, psum.shape[0], eps,
        HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, ACC_DTYPE=acc,
        TILE_M=tile_m, BLOCK_T=_STATS_BLOCK_T, BLOCK_C=_bn.BLOCK_C)
    res = residual if residual is not None else y
    _bn_act_fwd_kernel[(triton.cdiv(m, _bn.BLOCK_M), triton.cdiv(c_out, _bn.BLOCK_C))](
        y, scale, shift, res, out, m, c_out, h_out * w_out, w_out,
        *y.stride(), *res.stride(), *out.stride(),
        HAS_RESIDUAL=residual is not None, RELU=activation == "relu", ACC_DTYPE=acc,
        BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)
    return out, y, save_mean, save_var


GENERAL_NAME = "triton implicit GEMM (general)"
KERNEL_CHOICES = (
    (conv1x1_bn_act.NAME, conv1x1_bn_act.RULE),
    (grouped_conv_bn_act.NAME + " (G groups per tile)", grouped_conv_bn_act.RULE),
    (GENERAL_NAME, "every other convolution (direct multiply-adds when C_in/groups <= 4)"),
)
"""(kernel, when it runs) of the forward kernels the Triton backend picks from, first match wins."""


def _forward_kernel(weight_shape, stride, padding, dilation, groups) -> tuple[str, list[str]]:
    """("conv1x1" | "grouped" | "general", why the specialised kernels were passed over)."""
    passed_over = []
    for name, module in (("conv1x1", conv1x1_bn_act), ("grouped", grouped_conv_bn_act)):
        why_not = module.mismatch(weight_shape, stride, padding, dilation, groups)
        if why_not is None:
            return name, passed_over
        passed_over.append(f"not {name}: {why_not}")
    return "general", passed_over


_aligned = _support.channels_last_aligned


def _vector_io(x, weight, residual, c_out: int, choice: str) -> bool:
    """Whether every operand of the 1x1 / grouped kernel is _aligned (the output is
    channels-last like x, with C_out % 16 == 0): such tiles move contiguous channel
    runs as vectors; otherwise every element has its own address and the kernels pick
    smaller tiles so as not to spill registers."""
    vector = (_aligned(x) and reference.output_memory_format(x) == torch.channels_last and c_out % 16 == 0
              and (residual is None or _aligned(residual)))
    if choice == "conv1x1":  # the weight is read in place as [C_out, C_in]
        vector = vector and weight.stride(1) == 1 and weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0
    return vector


def kernel_name(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                groups, training, eps, residual, activation) -> str:
    """The forward kernel this backend runs for these conv_bn_act arguments (the
    schema's), with the reason and its tiles, e.g. "triton conv1x1 GEMM + fused
    BN/residual/act epilogue (1x1 kernel, stride 1, padding 0, groups 1: ...)"."""
    c_out, cin_g = weight.shape[0], weight.shape[1]
    precision = _dot_precision(x.device)
    choice, passed_over = _forward_kernel(weight.shape, stride, padding, dilation, groups)
    vector = _vector_io(x, weight, residual, c_out, choice)
    layout = "vector" if vector else "scalar (an operand is not channels-last with 16-aligned strides)"
    if choice == "conv1x1":
        return (f"{conv1x1_bn_act.NAME} (1x1 kernel, stride {_pair_text(stride)}, padding 0, groups 1: "
                f"{conv1x1_bn_act.describe(x.dtype, cin_g, c_out, precision, vector)}, {layout} access)")
    if choice == "grouped":
        per_tile = grouped_conv_bn_act.groups_per_tile(cin_g)
        return (f"{grouped_conv_bn_act.NAME} ({per_tile} groups per tile) + fused BN/residual/act "
                f"epilogue (groups={groups}, 3x3, stride {_pair_text(stride)}, padding 1: "
                f"{grouped_conv_bn_act.describe(x.dtype, cin_g, precision, vector)}, "
                f"{layout} access)")
    out_channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    aligned = (out_channels_last and cin_g * groups % 16 == 0 and c_out % 16 == 0
               and (residual is None or _aligned(residual)))
    cfg = _conv_config(x.dtype, cin_g, c_out // groups, c_out, precision, aligned)
    how = ("direct multiply-adds, C_in/groups <= 4" if cfg["DIRECT"] else
           f"tl.dot tiles {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}")
    how += "" if aligned else f", {layout} access"
    return f"{GENERAL_NAME} + fused BN/residual/act epilogue ({'; '.join(passed_over)}; {how})"


def _pair_text(pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _conv(x, weight, bias, scale, shift, residual, out, stride, padding, dilation, groups, training, activation):
    """Runs the forward convolution kernel picked by _forward_kernel into `out` ([N, C_out,
    H_out, W_out], any strides), with the eval epilogue (scale, shift, residual) or the
    training one (bias). Training: returns the partial statistics (psum, pm2
    [row tiles, C_out]) and their row tile size, else (None, None, row tile size)."""
    choice, _ = _forward_kernel(weight.shape, stride, padding, dilation, groups)
    if choice == "general":
        return _conv_general(x, weight, bias, scale, shift, residual, out, stride, padding, dilation, groups,
                             training, activation)
    c_out, cin_g = weight.shape[0], weight.shape[1]
    precision, acc = _dot_precision(x.device), _acc_dtype(x.dtype)
    vector = _vector_io(x, weight, residual, c_out, choice)
    if choice == "conv1x1":
        cfg = conv1x1_bn_act.config(x.dtype, cin_g, c_out, precision, vector)
    else:
        cfg = grouped_conv_bn_act.config(x.dtype, cin_g, precision, vector)
    psum, pm2 = _partial_stats(out, cfg["BLOCK_M"]) if training else (None, None)
    if choice == "conv1x1":
        conv1x1_bn_act.launch(x, weight, bias, scale, shift, residual, out, psum, pm2, stride, cfg, acc,
                              training, activation)
    else:
        grouped_conv_bn_act.launch(x, weight, bias, scale, shift, residual, out, psum, pm2, stride, padding,
                                   groups, cfg, acc, training, activation)
    return psum, pm2, cfg["BLOCK_M"]


def _partial_stats(out: torch.Tensor, tile_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (psum, pm2) [cdiv(M, tile_m), C_out] for the training epilogue."""
    n, c_out, h_out, w_out = out.shape
    psum = torch.empty((triton.cdiv(n * h_out * w_out, tile_m), c_out), dtype=reference.stats_dtype(out.dtype),
                       device=out.device)
    return psum, torch.empty_like(psum)


def _conv_general(x, weight, bias, scale, shift, residual, out, stride, padding, dilation, groups, training,
                  activation):
    """Launches the general implicit-GEMM kernel (_implicit_gemm.py; arguments and result as _conv)."""
    x = x.contiguous(memory_format=torch.channels_last)
    c_out, cin_g = weight.shape[0], weight.shape[1]
    aligned = _aligned(x) and _aligned(out) and (residual is None or _aligned(residual))
    cfg = _conv_config(x.dtype, cin_g, c_out // groups, c_out, _dot_precision(x.device), aligned)
    psum, pm2 = _partial_stats(out, cfg["BLOCK_M"]) if training else (None, None)
    _implicit_gemm.launch(x, weight, bias, scale, shift, residual, out, psum, pm2, stride, padding, dilation, groups,
                          cfg, _acc_dtype(x.dtype), prologue=False, training=training, activation=activation)
    return psum, pm2, cfg["BLOCK_M"]


def backward(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, stride, padding,
             dilation, groups, training, eps, activation, output_mask):
    """conv_bn_act backward; arguments and results exactly as reference.conv_bn_act_backward.

    grad_out, out [N, C_out, H_out, W_out]; conv_out the forward's y (empty in eval:
    recomputed with the forward kernel when grad_bn_weight is wanted); save_mean,
    save_var [C_out]. Returns (grad_x, grad_weight, grad_bias, grad_bn_weight,
    grad_bn_bias, grad_residual), unwanted ones (output_mask False) as empty [0].
    Triton computes the BN / activation part (per-channel sums of g and g*xhat, then
    grad_y and grad_residual in one elementwise pass); grad_x, grad_weight and grad_bias
    come from torch.ops.aten.convolution_backward on grad_y (cuDNN on GPU).
    """
    fmt = reference.output_memory_format(x)
    sdtype = reference.stats_dtype(x.dtype)
    acc = _acc_dtype(x.dtype)
    n, c_out, h_out, w_out = grad_out.shape
    m = n * h_out * w_out
    want_conv = any(output_mask[:3])
    relu = activation == "relu"
    need_y = training or output_mask[3]
    need_sums = (training and want_conv) or output_mask[3] or output_mask[4]
    y = conv_out
    if need_y and y.numel() == 0:
        y = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
        _conv(x, weight, bias, None, None, None, y, stride, padding, dilation, groups, True, activation)
    y_arg = y if need_y else grad_out
    grad_beta = torch.empty(c_out, dtype=sdtype, device=x.device)
    grad_gamma = torch.empty_like(grad_beta)
    if need_sums:
        splits, rows_per_split = _bn.splits(m)
        pg = torch.empty((splits, c_out), dtype=sdtype, device=x.device)
        pgy = torch.empty_like(pg)
        _bn.bwd_reduce_kernel[(splits, triton.cdiv(c_out, _bn.BLOCK_C))](
            grad_out, out, y_arg, save_mean, save_mean, save_mean, pg, pgy, m, c_out, h_out * w_out, w_out,
            rows_per_split, *grad_out.stride(), *out.stride(), *y_arg.stride(),
            HAS_V=need_y, ACT_INPUT=False, RELU=relu, ACC_DTYPE=acc, BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)
        _bn.bwd_finalize_kernel[(triton.cdiv(c_out, _bn.BLOCK_C),)](
            pg, pgy, save_var, grad_beta, grad_gamma, c_out, splits, eps,
            HAS_V=need_y, INVSTD=False, ACC_DTYPE=acc, BLOCK_S=_bn.BLOCK_S, BLOCK_C=_bn.BLOCK_C)

    dy = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=fmt) if want_conv else None
    grad_res = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                           memory_format=fmt) if output_mask[5] else None
    if want_conv or output_mask[5]:
        dy_arg = dy if dy is not None else grad_res
        gres_arg = grad_res if grad_res is not None else dy
        _bn_bwd_elementwise_kernel[(triton.cdiv(m, _bn.BLOCK_M), triton.cdiv(c_out, _bn.BLOCK_C))](
            grad_out, out, y_arg, save_mean, save_var, bn_weight if bn_weight is not None else save_var,
            grad_beta, grad_gamma, dy_arg, gres_arg, m, c_out, h_out * w_out, w_out, eps,
            *grad_out.stride(), *out.stride(), *y_arg.stride(), *dy_arg.stride(), *gres_arg.stride(),
            TRAINING=training, HAS_GAMMA=bn_weight is not None, RELU=relu, WRITE_DY=want_conv,
            WRITE_GRES=output_mask[5], ACC_DTYPE=acc, BLOCK_M=_bn.BLOCK_M, BLOCK_C=_bn.BLOCK_C)

    empty_x, empty_s = x.new_empty(0), save_mean.new_empty(0)
    grad_x = grad_w = grad_b = empty_x
    if want_conv:
        gx, gw, gb = torch.ops.aten.convolution_backward(
            dy, x, weight, [c_out] if bias is not None else None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [output_mask[0], output_mask[1], output_mask[2]])
        grad_x = gx.contiguous(memory_format=fmt) if output_mask[0] else empty_x
        grad_w = reference.like_weight(gw, weight) if output_mask[1] else empty_x
        grad_b = gb.contiguous() if output_mask[2] else empty_x
    return (grad_x, grad_w, grad_b,
            grad_gamma if output_mask[3] else empty_s,
            grad_beta if output_mask[4] else empty_s,
            grad_res if output_mask[5] else empty_x)
