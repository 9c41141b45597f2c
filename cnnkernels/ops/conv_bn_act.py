"""cnnkernels.ops.conv_bn_act: convolution + BatchNorm + activation (+ residual), fused.

The registered ops (schemas in cnnkernels/schemas.def):
  cnnkernels::conv_bn_act           forward, returns (out, conv_out, save_mean, save_var)
  cnnkernels::conv_bn_act_backward  the six gradients
Both get their CPU and CUDA kernels here; each kernel picks a backend per call
(cnnkernels/_backends.py). Fake implementations and autograd are registered here too,
so torch.compile(fullgraph=True) traces the op without a graph break.
"""
from __future__ import annotations

from math import prod

import torch

from cnnkernels import _cost, _library, reference
from cnnkernels.ops import _autocast, _checks, _conv_bn_act_choice, _conv_bn_core, _registration

OP = "conv_bn_act"
BACKWARD_OP = "conv_bn_act_backward"
_FORWARD_ARGS = ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var",
                 "stride", "padding", "dilation", "groups", "training", "eps", "residual", "activation")
_GRAD_INPUT_INDEX = (0, 1, 2, 3, 4, 13)  # x, weight, bias, bn_weight, bn_bias, residual


def conv_bn_act(x, weight, bias=None, bn_weight=None, bn_bias=None, running_mean=None,
                running_var=None, *, stride=1, padding=0, dilation=1, groups=1, training=False,
                momentum=0.1, eps=1e-5, residual=None, activation="relu"):
    """act(batch_norm(conv2d(x, weight, bias)) + residual) in one fused op.

    Shapes: x [N, C_in, H, W]; weight [C_out, C_in/groups, kH, kW]; bias, bn_weight,
    bn_bias, running_mean, running_var [C_out] (each may be None: no conv bias,
    gamma = 1, beta = 0, no running statistics); residual [N, C_out, H_out, W_out].
    Returns [N, C_out, H_out, W_out] in x's dtype and memory format (channels_last in,
    channels_last out).

    Semantics are exactly those of
    ``act(F.batch_norm(F.conv2d(x, weight, bias, stride, padding, dilation, groups),
    running_mean, running_var, bn_weight, bn_bias, training, momentum, eps) + residual)``
    with activation "relu" or "none": in training the batch statistics normalise and
    the running statistics (if given) are updated in place with `momentum` and the
    unbiased batch variance; in eval the running statistics normalise.
    stride, padding and dilation take an int or a pair. Gradients flow to x, weight,
    bias, bn_weight, bn_bias and residual. Which backend runs is explained by
    ``cnnkernels.ops.explain("conv_bn_act", x, weight, ...)``.
    """
    x, weight, bias, residual = _autocast.cast(_autocast.lower_precision(x), x, weight, bias, residual)
    args = _normalize(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride,
                      padding, dilation, groups, training, eps, residual, activation)
    _conv_bn_core.check_momentum(momentum)
    out, _, save_mean, save_var = torch.ops.cnnkernels.conv_bn_act(*args)
    if training and running_mean is not None:
        _conv_bn_core.update_running_stats(running_mean, running_var, save_mean, save_var, out, momentum)
    return out


def _normalize(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
               dilation, groups, training, eps, residual, activation) -> tuple:
    """Checks every argument and returns them in the schema's order and types."""
    stride, padding, dilation, out_shape = _conv_bn_core.check_conv_bn(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
        training, eps, activation, bn_over="output")
    if residual is not None:
        _checks.check_tensor(residual, "residual", ndim=4)
        _checks.check_like(residual, "residual", x)
        if list(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {tuple(out_shape)}, got {tuple(residual.shape)}")
    return (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
            bool(training), float(eps), residual, activation)


def _normalize_call(*args, **kwargs) -> tuple:
    """The schema's arguments for a call written like conv_bn_act(*args, **kwargs)."""
    return _normalize(*_registration.bind(conv_bn_act, args, kwargs, drop=("momentum",)))


def _sample(device):
    x, weight, per_channel = torch.randn(2, 8, 8, 8, device=device), torch.randn(16, 8, 3, 3, device=device), \
        torch.ones(16, device=device)
    return (x, weight, None, per_channel, per_channel, per_channel, per_channel), {"padding": 1}


def _analysis_cost(v: dict, result) -> _cost.OpCost:
    """One call as cnnkernels.analysis counts it (module docstring there)."""
    x, weight, out, residual, activation = v["x"], v["weight"], result[0], v["residual"], v["activation"]
    bn_vectors = [v[k] for k in ("bn_weight", "bn_bias", "running_mean", "running_var")]
    unfused = (_cost.nbytes(x, weight, v["bias"], out) + 2 * _cost.nbytes(out)
               + _cost.nbytes(*bn_vectors) + _cost.epilogue_bytes(out, residual, activation))
    return _cost.OpCost(_cost.steps(["conv", "bn"], residual is not None, activation), x,
                        [residual] if residual is not None else [], [weight, v["bias"], *bn_vectors], out,
                        out.numel() * weight[0].numel() + out.numel(), unfused)


def _traffic(x_shape, weight_shape, *, stride=1, padding=0, dilation=1, residual=False,
             activation="relu", mode="eval", input_grad=True, itemsize=4) -> _cost.Traffic:
    """Memory traffic (cnnkernels.bench.traffic) of act(bn(conv2d(x, weight)) + residual):
    x [N, C_in, H, W], weight [C_out, C_in/g, kH, kW]."""
    train, relu = _cost.check_mode(mode), _cost.check_activation(activation)
    x = prod(x_shape) * itemsize
    w = prod(weight_shape) * itemsize
    y = prod(_cost.conv_output_shape(x_shape, weight_shape, stride, padding, dilation)) * itemsize
    res = "residual" if residual else None
    sizes = {"x": x, "weight": w, "folded_weight": w, "grad_x": x, "grad_weight": w}
    sizes.update({name: y for name in ("conv_out", "bn_out", "sum", "out", "residual", "grad_out", "grad_sum",
                                       "grad_conv_out", "grad_residual")})
    unfused, fused = _cost.Passes(sizes), _cost.Passes(sizes)
    unfused.add("conv2d", ("x", "weight"), ("conv_out",))
    if train:
        unfused.add("batch_norm statistics", ("conv_out",))
    unfused.add("batch_norm", ("conv_out",), ("bn_out",))
    unfused.add("add", ("bn_out", res), ("sum",), when=residual)
    unfused.add("relu", ("sum" if residual else "bn_out",), ("out",), when=relu)
    if train:
        grad_bn = "grad_sum" if relu else "grad_out"
        unfused.add("relu backward", ("grad_out", "out"), ("grad_sum",), when=relu)
        unfused.add("batch_norm backward reduce", (grad_bn, "conv_out"))
        unfused.add("batch_norm backward", (grad_bn, "conv_out"), ("grad_conv_out",))
        unfused.add("conv2d backward input", ("grad_conv_out", "weight"), ("grad_x",), when=input_grad)
        unfused.add("conv2d backward weight", ("grad_conv_out", "x"), ("grad_weight",))

        fused.add("conv2d", ("x", "weight"), ("conv_out",))
        fused.add("batch statistics", ("conv_out",))
        fused.add("normalize + residual + act", ("conv_out", res), ("out",))
        mask = "out" if relu else None
        fused.add("backward reduce", ("grad_out", mask, "conv_out"))
        fused.add("backward elementwise", ("grad_out", mask, "conv_out"),
                  ("grad_conv_out", "grad_residual" if residual else None))
        fused.add("conv2d backward input", ("grad_conv_out", "weight"), ("grad_x",), when=input_grad)
        fused.add("conv2d backward weight", ("grad_conv_out", "x"), ("grad_weight",))
    else:
        fused.add("fold BN scale into weight", ("weight",), ("folded_weight",))
        fused.add("conv2d + shift + residual + act epilogue", ("x", "folded_weight", res), ("out",))
    return _cost.Traffic("conv_bn_act", mode, tuple(unfused.passes), tuple(fused.passes))


_registration.declare_call(OP, _normalize_call, _sample, cost=_analysis_cost, traffic=_traffic)


# --- backends and dispatcher registrations ---------------------------------------------

_TRITON = _registration.TritonModule("cnnkernels.triton.conv_bn_act")


_registration.register(
    OP, family=OP,
    reference=("plain torch: conv2d, batch statistics, affine, activation", reference.conv_bn_act_forward),
    native=({"cpu": "oneDNN fused convolution (eval) or ATen convolution + fused C++ "
                    "stats/normalize/residual/activation pass",
             "cuda": "kernel picked by shape (1x1 GEMM, grouped 3x3, else cuDNN) + fused BN/residual/activation "
                     "epilogue"}, "_conv_bn_act_forward_native"),
    native_describe={"cpu": _conv_bn_act_choice.describe_cpu, "cuda": _conv_bn_act_choice.describe_cuda},
    triton=("convolution kernel picked by shape (1x1 GEMM, grouped, general implicit GEMM) with fused "
            "BN/residual/activation epilogue", _TRITON.function("forward"), _TRITON.reasons),
    triton_describe=_TRITON.function("kernel_name"))
_registration.register(
    BACKWARD_OP, family=OP, x_index=2,
    reference=("plain torch", reference.conv_bn_act_backward),
    native=("fused BN/activation backward pass + ATen convolution_backward", "_conv_bn_act_backward_native"),
    triton=("Triton BN/activation backward kernels + ATen convolution_backward", _TRITON.function("backward"),
            _TRITON.reasons_from("backward_unsupported_reasons")))


@torch.library.register_fake(f"cnnkernels::{OP}")
def _forward_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                  dilation, groups, training, eps, residual, activation):
    fmt = reference.output_memory_format(x)
    shape = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    out = x.new_empty(shape).contiguous(memory_format=fmt)
    conv_out = torch.empty_like(out) if training else x.new_empty(0)
    sdtype = reference.stats_dtype(x.dtype)
    return out, conv_out, x.new_empty(shape[1], dtype=sdtype), x.new_empty(shape[1], dtype=sdtype)


@torch.library.register_fake(f"cnnkernels::{BACKWARD_OP}")
def _backward_fake(grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, stride,
                   padding, dilation, groups, training, eps, activation, output_mask):
    fmt = reference.output_memory_format(x)
    c_out = weight.shape[0]
    wanted = (
        (lambda: torch.empty_like(x, memory_format=fmt)),
        (lambda: torch.empty_like(weight)),
        (lambda: x.new_empty(c_out)),
        (lambda: save_mean.new_empty(c_out)),
        (lambda: save_mean.new_empty(c_out)),
        (lambda: torch.empty_like(out, memory_format=fmt)),
    )
    empties = (x, x, x, save_mean, save_mean, x)
    return tuple(make() if want else like.new_empty(0) for make, want, like in zip(wanted, output_mask, empties))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the unused outputs' gradients
    x, weight, bias, bn_weight = inputs[0], inputs[1], inputs[2], inputs[3]
    out, conv_out, save_mean, save_var = output
    ctx.save_for_backward(out, x, weight, bias, conv_out, bn_weight, save_mean, save_var)
    ctx.conv_params = inputs[7:13] + (inputs[14],)  # stride, padding, dilation, groups, training, eps, activation
    ctx.param_dtypes = {3: inputs[3].dtype if inputs[3] is not None else None,
                        4: inputs[4].dtype if inputs[4] is not None else None}
    ctx.mark_non_differentiable(conv_out, save_mean, save_var)


def _backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
    out, x, weight, bias, conv_out, bn_weight, save_mean, save_var = ctx.saved_tensors
    stride, padding, dilation, groups, training, eps, activation = ctx.conv_params
    mask = [bool(ctx.needs_input_grad[i]) for i in _GRAD_INPUT_INDEX]
    grads = [None] * len(_FORWARD_ARGS)
    if grad_out is None or not any(mask):
        return tuple(grads)
    results = torch.ops.cnnkernels.conv_bn_act_backward(
        grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, stride, padding,
        dilation, groups, training, eps, activation, mask)
    for index, wanted, grad in zip(_GRAD_INPUT_INDEX, mask, results):
        if wanted:
            dtype = ctx.param_dtypes.get(index)
            grads[index] = grad.to(dtype) if dtype is not None else grad
    return tuple(grads)


# The same formula is compiled in csrc/autograd/conv_bn_act.cpp (far less per-call work);
# this one serves where the extension is missing.
if not _library.has_native_kernel(OP, "Autograd"):
    torch.library.register_autograd(f"cnnkernels::{OP}", _backward, setup_context=_setup_context)
