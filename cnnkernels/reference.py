"""Every op composed from plain torch: the ground truth of the tests and the fallback
backend. Functions here take and return exactly what the op schemas in
cnnkernels/schemas.def declare.

conv_bn_act contract (shared by every backend):

forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        stride, padding, dilation, groups, training, eps, residual, activation)
    -> (out, conv_out, save_mean, save_var)
  x [N, C_in, H, W]; weight [C_out, C_in/groups, kH, kW]; bias, bn_* [C_out] or None.
  out [N, C_out, H_out, W_out] = act(bn(conv2d(x) + bias) + residual), in x's dtype and
    in x's memory format (channels_last when x is channels-last and not contiguous).
  conv_out: training: conv2d(x) + bias (kept for backward), same shape/format as out;
    eval: an empty tensor of shape [0].
  save_mean, save_var [C_out] in the statistics dtype (float64 for float64 input,
    float32 otherwise): training: the batch mean and the biased batch variance;
    eval: copies of running_mean and running_var.
  Running statistics are never touched here: ops/conv_bn_act.py updates them.

backward(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var,
         stride, padding, dilation, groups, training, eps, activation, output_mask)
    -> (grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_residual)
  output_mask [6] says which of the six are wanted; an unwanted one is an empty [0]
  tensor. grad_x and grad_residual come in x's memory format, grad_weight in weight's
  layout (like_weight), the rest contiguous.
  grad_bn_weight and grad_bn_bias are in the statistics dtype. In eval, an empty
  conv_out means "recompute it from x" (needed only for grad_bn_weight).

bn_act_conv contract (pre-activation order, DenseNet / pre-act ResNet; every backend):

forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        stride, padding, dilation, groups, training, eps, activation)
    -> (out, save_mean, save_var)
  x [N, C_in, H, W], ANY strides (typically a channel-prefix view buf[:, :C_in] of a
    wider NCHW or channels_last buffer; never required contiguous);
  weight [C_out, C_in/groups, kH, kW]; bias [C_out] or None;
  bn_weight, bn_bias, running_mean, running_var [C_in] or None (BN is over x's channels).
  a = x * scale + shift with scale = bn_weight * rsqrt(var + eps), shift = bn_bias -
    mean * scale (per channel, in the statistics dtype); z = act(a) rounded to x's dtype;
  out [N, C_out, H_out, W_out] = conv2d(z, weight, bias), in x's dtype and in
    bn_act_conv_memory_format(x): channels_last when x's channel stride is 1 and x is not
    contiguous (prefix views of a channels_last buffer), contiguous otherwise.
  save_mean, save_var [C_in] in the statistics dtype: training: the batch mean and the
    biased batch variance of x; eval: copies of running_mean and running_var.
  Running statistics are never touched here: ops/bn_act_conv.py updates them.

into(out, <the forward's arguments>) -> (save_mean, save_var)
  The same, with the result written into `out` ([N, C_out, H_out, W_out], x's dtype,
  any strides, e.g. the channel slice buf[:, c0:c0 + C_out] of a bigger buffer; not
  overlapping x); no other element of out's storage is written.

backward(grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var, stride,
         padding, dilation, groups, training, eps, activation, output_mask)
    -> (grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias)
  Recomputes z from x and the saved statistics (nothing else is kept for backward),
  takes grad_z, grad_weight, grad_bias from the convolution's backward, then
  g = grad_z * (a > 0) (relu) or grad_z (none), xhat = (x - mean) * invstd:
  grad_bn_bias = sum g, grad_bn_weight = sum g * xhat (over N, H, W);
  grad_x = gamma * invstd * (g - grad_bn_bias / M - xhat * grad_bn_weight / M) in
  training (M = N*H*W), gamma * invstd * g in eval.
  output_mask [5] says which are wanted; an unwanted one (or grad_bias without a bias)
  is an empty [0] tensor. grad_x in bn_act_conv_memory_format(x), grad_weight in weight's
  layout (like_weight), the rest contiguous;
  grad_bn_weight and grad_bn_bias in the statistics dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "none")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def like_weight(grad_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_weight in weight's layout (torch.empty_like(weight)'s strides), as autograd
    keeps parameter gradients: no copy when the convolution's backward already gave it."""
    if grad_weight.stride() == weight.stride():
        return grad_weight
    return torch.empty_like(weight).copy_(grad_weight)


def conv_output_size(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    n, _, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, c_out, h_out, w_out]


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(z) if activation == "relu" else z


def _bn_scale_shift(bn_weight, bn_bias, mean, var, eps, c_out, sdtype, device):
    invstd = torch.rsqrt(var.to(sdtype) + eps)
    gamma = bn_weight.to(sdtype) if bn_weight is not None else torch.ones(c_out, dtype=sdtype, device=device)
    beta = bn_bias.to(sdtype) if bn_bias is not None else torch.zeros(c_out, dtype=sdtype, device=device)
    scale = gamma * invstd
    return scale, beta - mean.to(sdtype) * scale


def conv_bn_act_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        stride, padding, dilation, groups, training, eps, residual, activation):
    fmt = output_memory_format(x)
    sdtype = stats_dtype(x.dtype)
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    c_out = y.shape[1]
    if training:
        y32 = y.to(sdtype)
        save_var, save_mean = torch.var_mean(y32, dim=(0, 2, 3), unbiased=False)
    else:
        save_mean, save_var = running_mean.to(sdtype).clone(), running_var.to(sdtype).clone()
    scale, shift = _bn_scale_shift(bn_weight, bn_bias, save_mean, save_var, eps, c_out, sdtype, x.device)
    z = y.to(sdtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual.to(sdtype)
    out = _activate(z, activation).to(x.dtype).contiguous(memory_format=fmt)
    conv_out = y.contiguous(memory_format=fmt) if training else x.new_empty(0)
    return out, conv_out, save_mean, save_var


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def conv_bn_act_backward(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var,
                         stride, padding, dilation, groups, training, eps, activation, output_mask):
    fmt = output_memory_format(x)
    sdtype = stats_dtype(x.dtype)
    c_out = weight.shape[0]
    g = grad_out.to(sdtype)
    if activation == "relu":
        g = torch.where(out > 0, g, g.new_zeros(()))
    invstd = torch.rsqrt(save_var.to(sdtype) + eps)
    mean = save_mean.to(sdtype)
    gamma = bn_weight.to(sdtype) if bn_weight is not None else torch.ones(c_out, dtype=sdtype, device=x.device)
    need_y = training or output_mask[3]
    if need_y:
        y = conv_out if conv_out.numel() > 0 else F.conv2d(
            x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
        xhat = (y.to(sdtype) - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    grad_beta = g.sum(dim=(0, 2, 3))
    grad_gamma = (g * xhat).sum(dim=(0, 2, 3)) if need_y else None
    if training:
        count = g.numel() // c_out
        dy = (gamma * invstd).view(1, -1, 1, 1) * (
            g - (grad_beta / count).view(1, -1, 1, 1) - xhat * (grad_gamma / count).view(1, -1, 1, 1))
    else:
        dy = g * (gamma * invstd).view(1, -1, 1, 1)
    dy = dy.to(x.dtype)

    grad_x = grad_w = grad_b = None
    if any(output_mask[:3]):
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            dy, x, weight, [c_out] if bias is not None else None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [output_mask[0], output_mask[1], output_mask[2]])
    return (
        grad_x.contiguous(memory_format=fmt) if output_mask[0] else _empty(x),
        like_weight(grad_w, weight) if output_mask[1] else _empty(x),
        grad_b.contiguous() if output_mask[2] else _empty(x),
        grad_gamma.contiguous() if output_mask[3] else _empty(save_mean),
        grad_beta.contiguous() if output_mask[4] else _empty(save_mean),
        g.to(x.dtype).contiguous(memory_format=fmt) if output_mask[5] else _empty(x),
    )


# --- add_act ------------------------------------------------------------------------
# forward(x, residual, activation) -> out = act(x + residual)
#   x, residual: same shape (any ndim >= 1), dtype and device, any strides; out in x's
#   dtype and in output_memory_format(x). The sum is formed in the statistics dtype and
#   rounded once (relu commutes with that rounding).
# backward(grad_out, out, activation) -> grad = grad_out * (out > 0) for relu, grad_out
#   for none: the gradient of both x and residual, in output_memory_format(out).

def add_act_forward(x, residual, activation):
    sdtype = stats_dtype(x.dtype)
    z = _activate(x.to(sdtype) + residual.to(sdtype), activation)
    return z.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def add_act_backward(grad_out, out, activation):
    fmt = output_memory_format(out)
    if activation == "relu":
        g = torch.where(out > 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
        return g.to(out.dtype).contiguous(memory_format=fmt)
    return torch.empty_like(out, memory_format=fmt).copy_(grad_out)  # a new tensor, never an alias


# --- se_excite ---------------------------------------------------------------------------
# forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation)
#     -> (out, squeezed, hidden, gate)
#   x [N, C, H, W]; fc1_weight [R, C], fc1_bias [R] or None; fc2_weight [C, R], fc2_bias
#   [C] or None (the public op flattens 1x1-conv weights to these); residual like x or None.
#   squeezed [N, C] = mean of x over H, W; hidden [N, R] = relu(fc1(squeezed)) (after the
#   relu); gate [N, C] = sigmoid(fc2(hidden)); all three in the statistics dtype.
#   out = act(x * gate[:, :, None, None] + residual), x's dtype and memory format.
# backward(grad_out, out, x, fc1_weight, fc2_weight, squeezed, hidden, gate, activation,
#          output_mask) -> (grad_x, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight,
#                           grad_fc2_bias, grad_residual)
#   g = grad_out (masked by out > 0 for relu); grad_residual = g;
#   d_gate = sum_hw g * x; d_z2 = d_gate * gate * (1 - gate); d_hidden = d_z2 @ fc2_weight;
#   d_z1 = d_hidden * (hidden > 0); grad_x = g * gate + (d_z1 @ fc1_weight) / (H * W);
#   grad_fc2_weight = d_z2^T @ hidden, grad_fc2_bias = sum_n d_z2, and alike for fc1.
#   Unwanted outputs (output_mask False) are empty [0]; every gradient in x's dtype,
#   grad_x and grad_residual in x's memory format, the others contiguous.

def se_excite_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation):
    fmt = output_memory_format(x)
    sdtype = stats_dtype(x.dtype)
    xs = x.to(sdtype)
    squeezed = xs.mean(dim=(2, 3))
    hidden = torch.relu(F.linear(squeezed, fc1_weight.to(sdtype),
                                 fc1_bias.to(sdtype) if fc1_bias is not None else None))
    gate = torch.sigmoid(F.linear(hidden, fc2_weight.to(sdtype),
                                  fc2_bias.to(sdtype) if fc2_bias is not None else None))
    z = xs * gate[:, :, None, None]
    if residual is not None:
        z = z + residual.to(sdtype)
    out = _activate(z, activation).to(x.dtype).contiguous(memory_format=fmt)
    return out, squeezed.contiguous(), hidden.contiguous(), gate.contiguous()


def se_excite_backward(grad_out, out, x, fc1_weight, fc2_weight, squeezed, hidden, gate, activation,
                       output_mask):
    fmt = output_memory_format(x)
    sdtype = stats_dtype(x.dtype)
    g = grad_out.to(sdtype)
    if activation == "relu":
        g = torch.where(out > 0, g, g.new_zeros(()))
    gate, hidden, squeezed = gate.to(sdtype), hidden.to(sdtype), squeezed.to(sdtype)
    d_gate = (g * x.to(sdtype)).sum(dim=(2, 3))
    d_z2 = d_gate * gate * (1 - gate)
    d_z1 = (d_z2 @ fc2_weight.to(sdtype)) * (hidden > 0)
    grad_x = None
    if output_mask[0]:
        d_squeezed = (d_z1 @ fc1_weight.to(sdtype)) / (x.shape[2] * x.shape[3])
        grad_x = g * gate[:, :, None, None] + d_squeezed[:, :, None, None]
    results = (
        grad_x,
        d_z1.t() @ squeezed if output_mask[1] else None,
        d_z1.sum(dim=0) if output_mask[2] else None,
        d_z2.t() @ hidden if output_mask[3] else None,
        d_z2.sum(dim=0) if output_mask[4] else None,
        g if output_mask[5] else None,
    )
    return tuple(
        _empty(x) if r is None else
        r.to(x.dtype).contiguous(memory_format=fmt if i in (0, 5) else torch.contiguous_format)
        for i, r in enumerate(results))


# --- bn_act_conv ---------------------------------------------------------------------
# Contract in the module docstring above.

def bn_act_conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x's channel stride is 1 and x is not contiguous, else contiguous."""
    if x.stride(1) == 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _bn_act_pre_activation(x, bn_weight, bn_bias, mean, var, eps):
    """a = x * scale + shift in the statistics dtype, with the op's scale and shift."""
    sdtype = stats_dtype(x.dtype)
    scale, shift = _bn_scale_shift(bn_weight, bn_bias, mean, var, eps, x.shape[1], sdtype, x.device)
    return x.to(sdtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def bn_act_conv_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        stride, padding, dilation, groups, training, eps, activation):
    fmt = bn_act_conv_memory_format(x)
    sdtype = stats_dtype(x.dtype)
    if training:
        save_var, save_mean = torch.var_mean(x.to(sdtype), dim=(0, 2, 3), unbiased=False)
    else:
        save_mean, save_var = running_mean.to(sdtype).clone(), running_var.to(sdtype).clone()
    a = _bn_act_pre_activation(x, bn_weight, bn_bias, save_mean, save_var, eps)
    z = _activate(a, activation).to(x.dtype).contiguous(memory_format=fmt)
    out = F.conv2d(z, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return out.contiguous(memory_format=fmt), save_mean.contiguous(), save_var.contiguous()


def bn_act_conv_into(out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                     stride, padding, dilation, groups, training, eps, activation):
    result, save_mean, save_var = bn_act_conv_forward(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
        groups, training, eps, activation)
    out.copy_(result)
    return save_mean, save_var


def bn_act_conv_backward(grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var,
                         stride, padding, dilation, groups, training, eps, activation, output_mask):
    fmt = bn_act_conv_memory_format(x)
    sdtype = stats_dtype(x.dtype)
    c_in, c_out = x.shape[1], weight.shape[0]
    a = _bn_act_pre_activation(x, bn_weight, bn_bias, save_mean, save_var, eps)
    z = _activate(a, activation).to(x.dtype).contiguous(memory_format=fmt)
    want_grad_z = output_mask[0] or output_mask[3] or output_mask[4]
    want_bias = bool(output_mask[2]) and bias is not None
    grad_z = grad_w = grad_b = None
    if want_grad_z or output_mask[1] or want_bias:
        grad_z, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(x.dtype), z, weight, [c_out] if bias is not None else None, list(stride),
            list(padding), list(dilation), False, [0, 0], groups,
            [want_grad_z, bool(output_mask[1]), want_bias])
    grad_x = grad_gamma = grad_beta = None
    if want_grad_z:
        g = grad_z.to(sdtype)
        if activation == "relu":
            g = torch.where(a > 0, g, g.new_zeros(()))
        invstd = torch.rsqrt(save_var.to(sdtype) + eps)
        xhat = (x.to(sdtype) - save_mean.to(sdtype).view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        grad_beta = g.sum(dim=(0, 2, 3))
        grad_gamma = (g * xhat).sum(dim=(0, 2, 3))
        gamma = bn_weight.to(sdtype) if bn_weight is not None else torch.ones(c_in, dtype=sdtype, device=x.device)
        k = (gamma * invstd).view(1, -1, 1, 1)
        if training:
            count = x.numel() // c_in
            grad_x = k * (g - (grad_beta / count).view(1, -1, 1, 1) - xhat * (grad_gamma / count).view(1, -1, 1, 1))
        else:
            grad_x = k * g
    empty_x, empty_s = x.new_empty(0), save_mean.new_empty(0, dtype=sdtype)
    return (
        grad_x.to(x.dtype).contiguous(memory_format=fmt) if output_mask[0] else empty_x,
        like_weight(grad_w, weight) if output_mask[1] else empty_x,
        grad_b.contiguous() if want_bias else empty_x,
        grad_gamma.contiguous() if output_mask[3] else empty_s,
        grad_beta.contiguous() if output_mask[4] else empty_s,
    )
