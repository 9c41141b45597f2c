"""Inference freezing: BatchNorm folded into its convolution's weights once, not per call.

In eval mode conv_bn_act computes act(conv(x, W * s) + t + residual) with
s = gamma / sqrt(running_var + eps) and t = beta - running_mean * s (+ conv bias * s).
Unfrozen, the CPU backend folds W * s on every call: one extra read and write of the
weights, which on late layers (large weights, small activations) costs more than the
fusion saves. `freeze(model)` lets every conv-BN pair of the model that runs through
conv_bn_act (ConvBNAct, FusedSequential, the cnnkernels models' conv/bn children) keep
W * s and t, computed once in exactly the driver's arithmetic, and pass them to the op
with an identity BatchNorm, so the results are bitwise those of the unfrozen call.

The folded copy is used only when all of these hold, and the plain path runs otherwise:
the BatchNorm is in eval mode, x is a CPU float32/float64 tensor of the weight's dtype,
no gradient is wanted (torch.no_grad, inference_mode, or no parameter requiring grad),
and torch.compile is not tracing. It is recomputed when any of the conv weight, conv
bias, gamma, beta, running_mean, running_var is replaced or changed in place through
autograd-visible operations (load_state_dict, param.copy_ under no_grad, optimizer
steps, .to()): the cache is keyed by their storages and version counters. Changes made
through `.data` bypass version counters, as with torch.compile's freezing: call
`unfreeze(model)` (or freeze again) after such edits.

Memory: a frozen model holds a folded copy of each such convolution weight next to the
original (the parameters stay, so the state_dict and training are unchanged): about the
size of the model's convolution weights once more. unfreeze releases it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["freeze", "unfreeze", "is_frozen", "folded_eval_arguments"]

_ATTR = "_cnnkernels_freeze"  # on the BatchNorm: None (frozen, nothing cached yet) or (key, arguments)


def freeze(model: nn.Module) -> nn.Module:
    """Marks every BatchNorm2d of model (the model itself included) frozen; returns model."""
    _check_module(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            setattr(module, _ATTR, None)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undoes freeze(model): drops every cached folded weight; returns model."""
    _check_module(model)
    for module in model.modules():
        if hasattr(module, _ATTR):
            delattr(module, _ATTR)
    return model


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def is_frozen(bn: nn.Module) -> bool:
    return hasattr(bn, _ATTR)


def _key(tensors, eps: float):
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                     for t in tensors) + (eps,)
    except RuntimeError:  # inference tensors carry no version counter: never cache them
        return None


def folded_eval_arguments(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> tuple | None:
    """For a frozen bn whose conditions hold (module docstring): the conv_bn_act arguments
    (weight, bias, bn_weight, bn_bias, running_mean, running_var, eps) that run the pair
    with BatchNorm already folded into the weight; None to take the plain path."""
    if not is_frozen(bn) or bn.training or bn.running_mean is None or not bn.track_running_stats:
        return None
    weight = conv.weight
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype
            or torch.compiler.is_compiling()):
        return None
    tensors = (weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    key = _key(tensors, bn.eps)
    if key is None:
        return None
    cached = getattr(bn, _ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        arguments = _fold(weight, conv.bias, bn)
    setattr(bn, _ATTR, (key, arguments))
    return arguments


def _fold(weight, bias, bn) -> tuple:
    # The C++ driver's eval arithmetic (csrc/common/conv_bn_act_driver.h), op for op.
    sdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    c_out = weight.shape[0]
    options = dict(dtype=sdtype, device=weight.device)
    gamma = bn.weight.to(sdtype) if bn.weight is not None else torch.ones(c_out, **options)
    beta = bn.bias.to(sdtype) if bn.bias is not None else torch.zeros(c_out, **options)
    scale = gamma * torch.rsqrt(bn.running_var.to(sdtype) + bn.eps)
    shift = beta - bn.running_mean.to(sdtype) * scale
    if bias is not None:
        shift = shift + bias.to(sdtype) * scale
    folded = (weight.to(sdtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    # Identity BatchNorm: gamma 1, mean 0, var 1, eps 0 -> scale exactly 1, shift exactly `shift`.
    return (folded, None, None, shift.to(weight.dtype), torch.zeros(c_out, dtype=weight.dtype, device=weight.device),
            torch.ones(c_out, dtype=weight.dtype, device=weight.device), 0.0)
