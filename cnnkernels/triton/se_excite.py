"""Triton backend of se_excite: the Squeeze-and-Excitation gate with a fused scale /
residual / activation pass, and its backward.

Kernels (each launched compiled on CUDA tensors, through Triton's interpreter on CPU
tensors, see cnnkernels/triton/_launch.py):
  _se_squeeze_kernel     grid (N, C tiles): squeezed[n, c] = mean over H*W of x.
  _se_fc_kernel          grid (N, R tiles): hidden[n, r] = relu(fc1_b[r] + W1[r, :] . squeezed[n, :]);
                         grid (N, C tiles): gate[n, c] = sigmoid(fc2_b[c] + W2[c, :] . hidden[n, :]).
  _se_scale_kernel       grid (row tiles, C tiles) over the N*H*W rows:
                         out = act(x * gate[n, c] + residual).
  _se_bwd_reduce_kernel  grid (N, C tiles): d_z2[n, c] = (sum_hw g * x) * gate * (1 - gate),
                         g = grad_out masked by out > 0 for relu.
  _se_fc_backward_kernel grid (N, R tiles): d_z1[n, r] = (d_z2[n, :] . W2[:, r]) * (hidden > 0);
                         grid (N, C tiles): d_sq[n, c] = (d_z1[n, :] . W1[:, c]) / (H*W).
  _se_wgrad_kernel       grid (I tiles, J tiles): grad_w[i, j] = sum_n a[n, i] * b[n, j] and
                         (first column of tiles) grad_b[i] = sum_n a[n, i].
  _se_bwd_elementwise_kernel  grid (row tiles, C tiles): grad_x = g * gate + d_sq,
                         grad_residual = g.
Every kernel takes the element strides of its 4-D tensors, so NCHW and channels_last
(and any other layout) work unchanged; outputs are allocated in x's memory format.
Accumulation is float32 (float64 for float64 input, which only the interpreter runs).
"""
from __future__ import annotations

import torch

from cnnkernels import reference
from cnnkernels.triton import _support
from cnnkernels.triton._support import jit, kernel, tl, triton
from cnnkernels.triton._tile import grad_before_act, program_tile, residual_act_store, tile_offsets

_BLOCK_S = 64  # pixels per step of the per-sample reductions
_BLOCK_C = 32  # channels per program
_BLOCK_K = 32  # reduction step of the fc kernels
_BLOCK_R = 32  # hidden units per program
_BLOCK_M = 64  # rows per program of the elementwise kernels
_BLOCK_W = 32  # rows / columns per program of the weight-gradient kernel
# 8 warps for _se_bwd_elementwise_kernel: with 4, triton 3.6 spills 4 bytes on sm_90
# (float16, relu, grad_x only); elementwise, so the warps change no result.
_BWD_ELEMENTWISE_WARPS = 8


# --- kernels --------------------------------------------------------------------------

@jit
def _pixel_offsets(n, pix, cols, W, s_n, s_c, s_h, s_w):
    """Element offsets [BLOCK_S, BLOCK_C] of the pixels pix (h*W + w) and channels cols of
    sample n in a 4-D tensor of strides (s_n, s_c, s_h, s_w)."""
    return n * s_n + ((pix // W) * s_h + (pix % W) * s_w)[:, None] + cols[None, :] * s_c


@kernel
def _se_squeeze_kernel(
    x_ptr, sq_ptr, C, S, W,
    sx_n, sx_c, sx_h, sx_w,
    ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """sq[n, c] = mean over the S = H*W pixels of x[n, c] (sq is [N, C] contiguous)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC_DTYPE)
    for s0 in range(0, S, BLOCK_S):
        pix = s0 + tl.arange(0, BLOCK_S)
        mask = (pix < S)[:, None] & col_mask[None, :]
        acc += tl.load(x_ptr + _pixel_offsets(n, pix, cols, W, sx_n, sx_c, sx_h, sx_w),
                       mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(sq_ptr + n * C + cols, tl.sum(acc, axis=0) / S, mask=col_mask)


@kernel
def _se_fc_kernel(
    v_ptr, w_ptr, b_ptr, out_ptr, K, J,
    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, j] = act(b[j] + sum_k w[j, k] * v[n, k]), act relu (fc1: squeezed ->
    hidden) or sigmoid (SIGMOID, fc2: hidden -> gate); w [J, K], v [N, K] contiguous."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_mask = rows < J
    acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        v = tl.load(v_ptr + n * K + ks, mask=k_mask, other=0.0)
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(ACC_DTYPE)
        acc += w * v[None, :]
    z = tl.sum(acc, axis=1)
    if HAS_BIAS:
        z += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    if SIGMOID:
        z = 1.0 / (1.0 + tl.exp(-z))
    else:
        z = tl.maximum(z, 0.0)
    tl.store(out_ptr + n * J + rows, z, mask=row_mask)


@kernel
def _se_scale_kernel(
    x_ptr, gate_ptr, res_ptr, out_ptr,
    M, C, S, W,
    sx_n, sx_c, sx_h, sx_w,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act(x * gate[n, c] + residual) over the M = N*H*W rows and C channels."""
    rows, cols, col_mask, mask = program_tile(M, C, BLOCK_M, BLOCK_C)
    n = (rows // S).to(tl.int64)
    x = tl.load(x_ptr + tile_offsets(rows, cols, S, W, sx_n, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC_DTYPE)
    gate = tl.load(gate_ptr + n[:, None] * C + cols[None, :], mask=mask, other=0.0)
    residual_act_store(x * gate, res_ptr, tile_offsets(rows, cols, S, W, sr_n, sr_c, sr_h, sr_w),
                       out_ptr, tile_offsets(rows, cols, S, W, so_n, so_c, so_h, so_w), mask,
                       HAS_RESIDUAL, RELU, ACC_DTYPE)


@kernel
def _se_bwd_reduce_kernel(
    grad_ptr, out_ptr, x_ptr, gate_ptr, dz2_ptr, C, S, W,
    sg_n, sg_c, sg_h, sg_w,
    so_n, so_c, so_h, so_w,
    sx_n, sx_c, sx_h, sx_w,
    RELU: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz2[n, c] = (sum_hw g * x) * gate * (1 - gate), g = grad_out (0 where out <= 0 for relu)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC_DTYPE)
    for s0 in range(0, S, BLOCK_S):
        pix = s0 + tl.arange(0, BLOCK_S)
        mask = (pix < S)[:, None] & col_mask[None, :]
        g = grad_before_act(grad_ptr, _pixel_offsets(n, pix, cols, W, sg_n, sg_c, sg_h, sg_w), out_ptr,
                            _pixel_offsets(n, pix, cols, W, so_n, so_c, so_h, so_w), mask, RELU, ACC_DTYPE)
        x = tl.load(x_ptr + _pixel_offsets(n, pix, cols, W, sx_n, sx_c, sx_h, sx_w),
                    mask=mask, other=0.0).to(ACC_DTYPE)
        acc += g * x
    gate = tl.load(gate_ptr + n * C + cols, mask=col_mask, other=0.0)
    tl.store(dz2_ptr + n * C + cols, tl.sum(acc, axis=0) * gate * (1.0 - gate), mask=col_mask)


@kernel
def _se_fc_backward_kernel(
    v_ptr, w_ptr, h_ptr, out_ptr, K, J, S,
    HIDDEN: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, j] = sum_k v[n, k] * w[k, j], w [K, J] and v [N, K] contiguous; then
    HIDDEN (through fc2 to the hidden units: d_z1 from d_z2): * (h[n, j] > 0);
    else (through fc1 to the squeezed input: d_sq from d_z1): / S."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < J
    acc = tl.zeros((BLOCK_K, BLOCK_J), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        v = tl.load(v_ptr + n * K + ks, mask=k_mask, other=0.0)
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * J + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(ACC_DTYPE)
        acc += v[:, None] * w
    if HIDDEN:
        h = tl.load(h_ptr + n * J + cols, mask=col_mask, other=0.0)
        tl.store(out_ptr + n * J + cols, tl.where(h > 0, tl.sum(acc, axis=0), 0.0), mask=col_mask)
    else:
        tl.store(out_ptr + n * J + cols, tl.sum(acc, axis=0) / S, mask=col_mask)


@kernel
def _se_wgrad_kernel(
    a_ptr, b_ptr, gw_ptr, gb_ptr, N, I, J,
    WRITE_W: tl.constexpr, WRITE_B: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """gw[i, j] = sum_n a[n, i] * b[n, j]; gb[i] = sum_n a[n, i] (by the programs of the
    first J tile). a [N, I], b [N, J], gw [I, J], gb [I], all contiguous. The row
    pointers step by I and J (64-bit pointer arithmetic: N * I may pass 2^31)."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = i < I
    j_mask = j < J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_I,), dtype=ACC_DTYPE)
    a_row = a_ptr + i
    b_row = b_ptr + j
    for _ in range(0, N):
        a = tl.load(a_row, mask=i_mask, other=0.0)
        if WRITE_W:
            b = tl.load(b_row, mask=j_mask, other=0.0)
            acc += a[:, None] * b[None, :]
        acc_b += a
        a_row += I
        b_row += J
    if WRITE_W:
        tl.store(gw_ptr + i.to(tl.int64)[:, None] * J + j[None, :], acc.to(gw_ptr.dtype.element_ty),
                 mask=i_mask[:, None] & j_mask[None, :])
    if WRITE_B:
        if tl.program_id(1) == 0:
            tl.store(gb_ptr + i, acc_b.to(gb_ptr.dtype.element_ty), mask=i_mask)


@kernel
def _se_bwd_elementwise_kernel(
    grad_ptr, out_ptr, gate_ptr, dsq_ptr, gx_ptr, gres_ptr,
    M, C, S, W,
    sg_n, sg_c, sg_h, sg_w,
    so_n, so_c, so_h, so_w,
    sd_n, sd_c, sd_h, sd_w,
    se_n, se_c, se_h, se_w,
    RELU: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GRES: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """g = grad_out (0 where out <= 0 for relu); grad_x = g * gate[n, c] + dsq[n, c];
    grad_residual = g."""
    rows, cols, col_mask, mask = program_tile(M, C, BLOCK_M, BLOCK_C)
    g = grad_before_act(grad_ptr, tile_offsets(rows, cols, S, W, sg_n, sg_c, sg_h, sg_w), out_ptr,
                        tile_offsets(rows, cols, S, W, so_n, so_c, so_h, so_w), mask, RELU, ACC_DTYPE)
    if WRITE_GRES:
        tl.store(gres_ptr + tile_offsets(rows, cols, S, W, se_n, se_c, se_h, se_w),
                 g.to(gres_ptr.dtype.element_ty), mask=mask)
    if WRITE_GX:
        per_sample = (rows // S).to(tl.int64)[:, None] * C + cols[None, :]
        gate = tl.load(gate_ptr + per_sample, mask=mask, other=0.0)
        dsq = tl.load(dsq_ptr + per_sample, mask=mask, other=0.0)
        tl.store(gx_ptr + tile_offsets(rows, cols, S, W, sd_n, sd_c, sd_h, sd_w),
                 (g * gate + dsq).to(gx_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------

_acc_dtype = _support.acc_dtype


def unsupported_reasons(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation) -> list[str]:
    """Why the Triton backend cannot run these se_excite arguments ([] when it can).

    CUDA tensors run compiled; CPU tensors run through Triton's interpreter (slow, for
    tests). float64 runs only in the interpreter."""
    if triton is None:
        return _support.missing_triton()
    reasons = _support.tensor_reasons(x, activation)
    if x.dim() != 4 or fc1_weight.dim() != 2 or fc2_weight.dim() != 2:
        reasons.append("x must be 4-D and the fc weights 2-D")
    elif x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0 or fc1_weight.shape[0] == 0:
        reasons.append("zero channels, pixels or hidden units")
    else:
        reasons += _support.index_reasons(x.shape[0] * x.shape[2] * x.shape[3],
                                          dict(x=x, residual=residual, out=x.shape))
    return reasons


def backward_unsupported_reasons(grad_out, out, x, fc1_weight, fc2_weight, squeezed, hidden, gate, activation,
                                 output_mask) -> list[str]:
    """unsupported_reasons for the backward's arguments: the forward's checks on x, and the
    int32 indexing of grad_out and out (read through their strides)."""
    reasons = unsupported_reasons(x, fc1_weight, None, fc2_weight, None, None, activation)
    if triton is None or x.dim() != 4 or grad_out.dim() != 4:
        return reasons
    return reasons + _support.index_reasons(x.shape[0] * x.shape[2] * x.shape[3], dict(grad_out=grad_out, out=out))


def forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation):
    """se_excite forward; arguments and results exactly as reference.se_excite_forward."""
    fmt = reference.output_memory_format(x)
    sdtype = reference.stats_dtype(x.dtype)
    acc = _acc_dtype(x.dtype)
    n, c, h, w = x.shape
    r = fc1_weight.shape[0]
    s = h * w
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    squeezed = torch.empty((n, c), dtype=sdtype, device=x.device)
    hidden = torch.empty((n, r), dtype=sdtype, device=x.device)
    gate = torch.empty((n, c), dtype=sdtype, device=x.device)
    if n == 0:
        return out, squeezed, hidden, gate
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()
    _se_squeeze_kernel[(n, triton.cdiv(c, _BLOCK_C))](
        x, squeezed, c, s, w, *x.stride(), ACC_DTYPE=acc, BLOCK_S=_BLOCK_S, BLOCK_C=_BLOCK_C)
    _se_fc_kernel[(n, triton.cdiv(r, _BLOCK_R))](
        squeezed, w1, fc1_bias if fc1_bias is not None else w1, hidden, c, r,
        HAS_BIAS=fc1_bias is not None, SIGMOID=False, ACC_DTYPE=acc, BLOCK_J=_BLOCK_R, BLOCK_K=_BLOCK_K)
    _se_fc_kernel[(n, triton.cdiv(c, _BLOCK_C))](
        hidden, w2, fc2_bias if fc2_bias is not None else w2, gate, r, c,
        HAS_BIAS=fc2_bias is not None, SIGMOID=True, ACC_DTYPE=acc, BLOCK_J=_BLOCK_C, BLOCK_K=_BLOCK_K)
    res = residual if residual is not None else x
    m = n * s
    _se_scale_kernel[(triton.cdiv(m, _BLOCK_M), triton.cdiv(c, _BLOCK_C))](
        x, gate, res, out, m, c, s, w, *x.stride(), *res.stride(), *out.stride(),
        HAS_RESIDUAL=residual is not None, RELU=activation == "relu", ACC_DTYPE=acc,
        BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C)
    return out, squeezed, hidden, gate


def backward(grad_out, out, x, fc1_weight, fc2_weight, squeezed, hidden, gate, activation, output_mask):
    """se_excite backward; arguments and results exactly as reference.se_excite_backward."""
    fmt = reference.output_memory_format(x)
    sdtype = reference.stats_dtype(x.dtype)
    acc = _acc_dtype(x.dtype)
    n, c, h, w = x.shape
    r = fc1_weight.shape[0]
    s = h * w
    m = n * s
    relu = activation == "relu"
    need_fc = any(output_mask[:5])
    empty = x.new_empty(0)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if output_mask[0] else None
    grad_res = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if output_mask[5] else None
    grads = [None] * 4  # grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias
    for i, shape in enumerate(((r, c), (r,), (c, r), (c,))):
        if output_mask[i + 1]:
            grads[i] = torch.empty(shape, dtype=x.dtype, device=x.device)
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()
    squeezed, hidden, gate = squeezed.contiguous(), hidden.contiguous(), gate.contiguous()
    out_arg = out if relu else grad_out
    dsq = None
    if need_fc and n > 0:
        dz2 = torch.empty((n, c), dtype=sdtype, device=x.device)
        dz1 = torch.empty((n, r), dtype=sdtype, device=x.device)
        _se_bwd_reduce_kernel[(n, triton.cdiv(c, _BLOCK_C))](
            grad_out, out_arg, x, gate, dz2, c, s, w, *grad_out.stride(), *out_arg.stride(), *x.stride(),
            RELU=relu, ACC_DTYPE=acc, BLOCK_S=_BLOCK_S, BLOCK_C=_BLOCK_C)
        _se_fc_backward_kernel[(n, triton.cdiv(r, _BLOCK_R))](
            dz2, w2, hidden, dz1, c, r, s, HIDDEN=True, ACC_DTYPE=acc, BLOCK_J=_BLOCK_R, BLOCK_K=_BLOCK_K)
        if output_mask[0]:
            dsq = torch.empty((n, c), dtype=sdtype, device=x.device)
            _se_fc_backward_kernel[(n, triton.cdiv(c, _BLOCK_C))](
                dz1, w1, hidden, dsq, r, c, s, HIDDEN=False, ACC_DTYPE=acc, BLOCK_J=_BLOCK_C, BLOCK_K=_BLOCK_K)
        for a, b, gw, gb, size_i, size_j in ((dz1, squeezed, grads[0], grads[1], r, c),
                                             (dz2, hidden, grads[2], grads[3], c, r)):
            if gw is None and gb is None:
                continue
            dummy = gw if gw is not None else gb
            _se_wgrad_kernel[(triton.cdiv(size_i, _BLOCK_W), triton.cdiv(size_j, _BLOCK_W) if gw is not None else 1)](
                a, b, dummy, gb if gb is not None else dummy, n, size_i, size_j,
                WRITE_W=gw is not None, WRITE_B=gb is not None, ACC_DTYPE=acc, BLOCK_I=_BLOCK_W, BLOCK_J=_BLOCK_W)
    elif need_fc:  # no samples: the weight gradients are sums over nothing
        for g in grads:
            if g is not None:
                g.zero_()
    if (grad_x is not None or grad_res is not None) and m > 0:
        gx_arg = grad_x if grad_x is not None else grad_res
        gres_arg = grad_res if grad_res is not None else grad_x
        dsq_arg = dsq if dsq is not None else gate
        _se_bwd_elementwise_kernel[(triton.cdiv(m, _BLOCK_M), triton.cdiv(c, _BLOCK_C))](
            grad_out, out_arg, gate, dsq_arg, gx_arg, gres_arg, m, c, s, w,
            *grad_out.stride(), *out_arg.stride(), *gx_arg.stride(), *gres_arg.stride(),
            RELU=relu, WRITE_GX=grad_x is not None, WRITE_GRES=grad_res is not None, ACC_DTYPE=acc,
            BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C, num_warps=_BWD_ELEMENTWISE_WARPS)
    return (grad_x if grad_x is not None else empty, *(g if g is not None else empty for g in grads),
            grad_res if grad_res is not None else empty)
