"""cnnkernels.ops.bn_act_conv: BatchNorm + activation + convolution, fused, in the
pre-activation order of DenseNet and pre-activation ResNet.

The registered ops (schemas in cnnkernels/schemas.def, contract in cnnkernels/reference.py):
  cnnkernels::bn_act_conv           forward, returns (out, save_mean, save_var)
  cnnkernels::bn_act_conv_into      forward into a given `out` (mutated), returns
                                    (save_mean, save_var)
  cnnkernels::bn_act_conv_backward  the five gradients, recomputing act(bn(x)) from x
All three get their CPU and CUDA kernels here; each kernel picks a backend per call
(cnnkernels/_backends.py). Fake implementations of all three and the autograd of
bn_act_conv are registered here too, so torch.compile(fullgraph=True) traces the op
without a graph break.
"""
from __future__ import annotations

from math import prod

import torch

from cnnkernels import _cost, reference
from cnnkernels.ops import _autocast, _checks, _conv_bn_core, _registration

OP = "bn_act_conv"
INTO_OP = "bn_act_conv_into"
BACKWARD_OP = "bn_act_conv_backward"
_GRAD_INPUTS = 5  # x, weight, bias, bn_weight, bn_bias: the first five schema arguments


def bn_act_conv(x, weight, bias=None, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, *,
                stride=1, padding=0, dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5,
                activation="relu", out=None):
    """conv2d(act(batch_norm(x)), weight, bias) in one fused op (BN -> activation -> conv).

    Shapes: x [N, C_in, H, W] with any strides (a channel-prefix view buf[:, :C_in] of a
    wider NCHW or channels_last buffer is read in place, not copied); weight
    [C_out, C_in/groups, kH, kW]; bias [C_out] or None; bn_weight, bn_bias, running_mean,
    running_var [C_in] (BN is over x's channels; each may be None: gamma = 1, beta = 0, no
    running statistics). Returns [N, C_out, H_out, W_out] in x's dtype.

    Semantics are exactly those of
    ``F.conv2d(act(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps)), weight, bias, stride, padding, dilation, groups)`` with
    activation "relu" or "none": in training the batch statistics normalise and the
    running statistics (if given) are updated in place with `momentum` and the unbiased
    batch variance; in eval the running statistics normalise. stride, padding and
    dilation take an int or a pair.

    out=None: a new tensor, channels_last when x's channel stride is 1 and x is not
    contiguous (so prefix views of a channels_last buffer give channels_last), contiguous
    otherwise; gradients flow to x, weight, bias, bn_weight and bn_bias, and the backward
    keeps only x and two [C_in] vectors (it recomputes act(bn(x))).
    out=<tensor> [N, C_out, H_out, W_out] of x's dtype and device, any strides (typically
    the channel slice buf[:, c0:c0 + C_out] of a bigger buffer, as a DenseNet block
    writes its new features): the result is written into it and `out` is returned; no
    other element of its storage is touched. This form records no autograd: with grad
    mode on, no input may require grad.

    Which backend runs is explained by ``cnnkernels.ops.explain("bn_act_conv", x, weight, ...)``
    (``"bn_act_conv_into"`` with out=).
    """
    x, weight, bias = _autocast.cast(_autocast.lower_precision(x), x, weight, bias)
    args = _normalize(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, groups, training, eps, activation)
    _conv_bn_core.check_momentum(momentum)
    if out is None:
        result, save_mean, save_var = torch.ops.cnnkernels.bn_act_conv(*args)
    else:
        _check_out(out, args)
        save_mean, save_var = torch.ops.cnnkernels.bn_act_conv_into(out, *args)
        result = out
    if training and running_mean is not None:
        _conv_bn_core.update_running_stats(running_mean, running_var, save_mean, save_var, x, momentum)
    return result


def _normalize(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
               groups, training, eps, activation) -> tuple:
    """Checks every argument and returns them in the schema's order and types."""
    stride, padding, dilation, _ = _conv_bn_core.check_conv_bn(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
        training, eps, activation, bn_over="input")
    return (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
            bool(training), float(eps), activation)


def _check_out(out, args) -> None:
    """out= of the into form: shape, dtype, device, no autograd to record, not x itself."""
    x, weight, bias, bn_weight, bn_bias = args[:5]
    _checks.check_tensor(out, "out", ndim=4)
    _checks.check_like(out, "out", x)
    shape = reference.conv_output_size(x.shape, weight.shape, args[7], args[8], args[9])
    if list(out.shape) != shape:
        raise ValueError(f"out must have the output's shape {tuple(shape)}, got {tuple(out.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (out, x, weight, bias, bn_weight, bn_bias)):
        raise RuntimeError("bn_act_conv(out=...) does not record autograd, but grad mode is on and an input "
                           "requires grad: call it under torch.no_grad() (or inside your own "
                           "autograd.Function), or without out=")
    if not torch.compiler.is_compiling() and out.data_ptr() == x.data_ptr() and out.numel() and x.numel():
        raise ValueError("out must not overlap x in memory (it starts at x's first element)")


def _normalize_call(*args, **kwargs) -> tuple:
    """The schema arguments of bn_act_conv for a call written like bn_act_conv(*args, **kwargs)."""
    return _normalize(*_registration.bind(bn_act_conv, args, kwargs, drop=("momentum", "out")))


def _normalize_into_call(*args, **kwargs) -> tuple:
    """The schema arguments of bn_act_conv_into for a call written like
    bn_act_conv(*args, out=out, **kwargs)."""
    out = kwargs.get("out")
    if out is None:
        raise ValueError("bn_act_conv_into needs out=")
    schema_args = _normalize_call(*args, **kwargs)
    _check_out(out, schema_args)
    return (out,) + schema_args


def _sample(device, out=False):
    x, weight, per_channel = torch.randn(2, 8, 8, 8, device=device), torch.randn(16, 8, 3, 3, device=device), \
        torch.ones(8, device=device)
    kwargs = {"padding": 1, **({"out": torch.empty(2, 16, 8, 8, device=device)} if out else {})}
    return (x, weight, None, per_channel, per_channel, per_channel, per_channel), kwargs


def _analysis_cost(v: dict, result) -> _cost.OpCost:
    """One call as cnnkernels.analysis counts it (module docstring there); the into form
    (v holds "out") writes out in place and returns the statistics."""
    nbytes = _cost.nbytes
    x, weight, activation = v["x"], v["weight"], v["activation"]
    out = v["out"] if "out" in v else result[0]
    bn_vectors = [v[k] for k in ("bn_weight", "bn_bias", "running_mean", "running_var")]
    kinds = ["bn"] + ([activation] if activation != "none" else []) + ["conv"]
    # unfused: BN (x in, x out, per-channel vectors), act (x in, x out), conv (x, w, b in, out)
    unfused = 2 * nbytes(x) + nbytes(*bn_vectors) + nbytes(x, weight, v["bias"], out)
    if activation != "none":
        unfused += 2 * nbytes(x)
    return _cost.OpCost(kinds, x, [], [weight, v["bias"], *bn_vectors], out,
                        x.numel() + out.numel() * weight[0].numel(), unfused)


def _traffic(x_shape, weight_shape, *, stride=1, padding=0, dilation=1, activation="relu", mode="eval",
             itemsize=4) -> _cost.Traffic:
    """Memory traffic (cnnkernels.bench.traffic) of conv2d(act(bn(x)), weight):
    x [N, C_in, H, W], weight [C_out, C_in/g, kH, kW]."""
    train, relu = _cost.check_mode(mode), _cost.check_activation(activation)
    x = prod(x_shape) * itemsize
    w = prod(weight_shape) * itemsize
    y = prod(_cost.conv_output_shape(x_shape, weight_shape, stride, padding, dilation)) * itemsize
    sizes = {"weight": w, "grad_weight": w, "out": y, "grad_out": y}
    sizes.update({name: x for name in ("x", "bn_out", "act_out", "grad_act", "grad_bn_out", "grad_x")})
    conv_in = "act_out" if relu else "bn_out"
    unfused, fused = _cost.Passes(sizes), _cost.Passes(sizes)
    if train:
        unfused.add("batch_norm statistics", ("x",))
        fused.add("batch statistics", ("x",))
    unfused.add("batch_norm", ("x",), ("bn_out",))
    unfused.add("relu", ("bn_out",), ("act_out",), when=relu)
    unfused.add("conv2d", (conv_in, "weight"), ("out",))
    fused.add("conv2d with bn + act prologue", ("x", "weight"), ("out",))
    if train:
        grad_bn = "grad_bn_out" if relu else "grad_act"
        unfused.add("conv2d backward input", ("grad_out", "weight"), ("grad_act",))
        unfused.add("conv2d backward weight", ("grad_out", conv_in), ("grad_weight",))
        unfused.add("relu backward", ("grad_act", "act_out"), ("grad_bn_out",), when=relu)
        unfused.add("batch_norm backward reduce", (grad_bn, "x"))
        unfused.add("batch_norm backward", (grad_bn, "x"), ("grad_x",))
        fused.add("conv2d backward input", ("grad_out", "weight"), ("grad_act",))
        fused.add("conv2d backward weight, bn + act recomputed from x", ("grad_out", "x"), ("grad_weight",))
        fused.add("bn + act backward reduce", ("grad_act", "x"))
        fused.add("bn + act backward elementwise", ("grad_act", "x"), ("grad_x",))
    return _cost.Traffic("bn_act_conv", mode, tuple(unfused.passes), tuple(fused.passes))


_registration.declare_call(OP, _normalize_call, _sample, cost=_analysis_cost, traffic=_traffic)
_registration.declare_call(INTO_OP, _normalize_into_call, lambda device: _sample(device, out=True), cost=_analysis_cost)


# --- backends and dispatcher registrations ---------------------------------------------

_TRITON = _registration.TritonModule("cnnkernels.triton.bn_act_conv")


def _triton_backward_reasons(grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var, stride,
                             padding, dilation, groups, training, eps, activation, output_mask):
    return _TRITON.reasons(x, weight, bias, bn_weight, bn_bias, None, None, stride, padding, dilation, groups,
                           training, eps, activation)


_REFERENCE_KERNEL = "plain torch: batch statistics, normalise + activation into a temporary, conv2d"
_NATIVE_KERNEL = {
    "cpu": "one fused statistics pass over strided x, one fused normalise + activation pass into a temporary, "
           "ATen convolution (oneDNN)",
    "cuda": "CUDA C++: statistics over strided x, convolution with the BN/activation applied to loaded x tiles",
}
_TRITON_KERNEL = "implicit-GEMM convolution with a BN/activation prologue on the x tiles, Chan-merged statistics"

_registration.register(
    OP, family=OP,
    reference=(_REFERENCE_KERNEL, reference.bn_act_conv_forward),
    native=(_NATIVE_KERNEL, "_bn_act_conv_forward_native"),
    triton=(_TRITON_KERNEL, _TRITON.function("forward"), _TRITON.reasons),
    triton_describe=_TRITON.function("describe"))
_registration.register(
    INTO_OP, family=OP, x_index=1,
    reference=(_REFERENCE_KERNEL + ", copy into out", reference.bn_act_conv_into),
    native=({backend: kernel + ", written into out" for backend, kernel in _NATIVE_KERNEL.items()},
            "_bn_act_conv_into_native"),
    triton=(_TRITON_KERNEL + ", stored through out's strides", _TRITON.function("into"),
            _TRITON.reasons_from("into_unsupported_reasons")),
    triton_describe=lambda out, *args: _TRITON.function("describe")(*args))
_registration.register(
    BACKWARD_OP, family=OP, x_index=1,
    reference=("plain torch: recompute act(bn(x)), aten convolution_backward, BN backward",
               reference.bn_act_conv_backward),
    native=("recompute act(bn(x)) in one pass, ATen convolution_backward, fused BN/activation backward passes "
            "over x", "_bn_act_conv_backward_native"),
    triton=("Triton recompute of act(bn(x)), ATen convolution_backward, Triton BN/activation backward kernels",
            _TRITON.function("backward"), _triton_backward_reasons))


def _fake_stats(x):
    return tuple(x.new_empty(x.shape[1], dtype=reference.stats_dtype(x.dtype)) for _ in range(2))


@torch.library.register_fake(f"cnnkernels::{OP}")
def _forward_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                  groups, training, eps, activation):
    shape = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=reference.bn_act_conv_memory_format(x))
    return (out,) + _fake_stats(x)


@torch.library.register_fake(f"cnnkernels::{INTO_OP}")
def _into_fake(out, x, *_):
    return _fake_stats(x)


@torch.library.register_fake(f"cnnkernels::{BACKWARD_OP}")
def _backward_fake(grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var, stride, padding,
                   dilation, groups, training, eps, activation, output_mask):
    sdtype = reference.stats_dtype(x.dtype)
    wanted = (
        output_mask[0] and (lambda: torch.empty_like(x, memory_format=reference.bn_act_conv_memory_format(x))),
        output_mask[1] and (lambda: torch.empty_like(weight)),
        output_mask[2] and bias is not None and (lambda: x.new_empty(weight.shape[0])),
        output_mask[3] and (lambda: x.new_empty(x.shape[1], dtype=sdtype)),
        output_mask[4] and (lambda: x.new_empty(x.shape[1], dtype=sdtype)),
    )
    empties = (x.dtype,) * 3 + (sdtype,) * 2
    return tuple(make() if make else x.new_empty(0, dtype=dtype) for make, dtype in zip(wanted, empties))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the unused outputs' gradients
    x, weight, bias, bn_weight, bn_bias = inputs[:_GRAD_INPUTS]
    _, save_mean, save_var = output
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, save_mean, save_var)
    ctx.conv_params = inputs[7:]  # stride, padding, dilation, groups, training, eps, activation
    ctx.param_dtypes = {3: bn_weight.dtype if bn_weight is not None else None,
                        4: bn_bias.dtype if bn_bias is not None else None}
    ctx.mark_non_differentiable(save_mean, save_var)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    x, weight, bias, bn_weight, bn_bias, save_mean, save_var = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[i]) for i in range(_GRAD_INPUTS)]
    grads = [None] * (_GRAD_INPUTS + 2 + len(ctx.conv_params))
    if grad_out is None or not any(mask):
        return tuple(grads)
    results = torch.ops.cnnkernels.bn_act_conv_backward(
        grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var, *ctx.conv_params, mask)
    for index, (wanted, grad) in enumerate(zip(mask, results)):
        if wanted:
            dtype = ctx.param_dtypes.get(index)
            grads[index] = grad.to(dtype) if dtype is not None else grad
    return tuple(grads)


torch.library.register_autograd(f"cnnkernels::{OP}", _backward, setup_context=_setup_context)
