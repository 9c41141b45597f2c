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

On top of the folding, a channels_last float32 or bfloat16 input on the CPU takes the
prepacked oneDNN path of cnnkernels/nn/frozen_cpu.py (weights reordered once per input
shape and dtype, one convolution call per pair); its results agree with the plain path
to float32 / bfloat16 rounding, not bitwise.
"""
from __future__ import annotations

import torch
from torch import nn

from cnnkernels.nn import frozen_cpu

__all__ = ["freeze", "unfreeze", "is_frozen", "folded_eval_arguments", "run_frozen_cpu"]

# On the BatchNorm: None (frozen, nothing cached yet) or (key, folded arguments, frozen_cpu.PackedWeights).
_ATTR = "_cnnkernels_freeze"


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
    # A replaced tensor (another dtype or device included) has another data_ptr.
    try:
        return [None if t is None else (t.data_ptr(), t._version) for t in tensors] + [eps]
    except RuntimeError:  # inference tensors carry no version counter: never cache them
        return None


def folded_eval_arguments(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> tuple | None:
    """For a frozen bn whose conditions hold (module docstring): the conv_bn_act arguments
    (weight, bias, bn_weight, bn_bias, running_mean, running_var, eps) that run the pair
    with BatchNorm already folded into the weight; None to take the plain path."""
    weight = conv.weight
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype
            or torch.compiler.is_compiling()):
        return None
    cached = _cached(conv, bn)
    return None if cached is None else cached[0]


def run_frozen_cpu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None,
                   activation: str, overwrite_residual: bool = False) -> torch.Tensor | None:
    """act(bn(conv(x)) + residual) through frozen_cpu's prepacked oneDNN call for a frozen
    bn, where its conditions hold; None to take the other paths."""
    if activation not in ("relu", "none") or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if not frozen_cpu.applies(x, residual):
        return None
    dtype = frozen_cpu.compute_dtype(x, conv.weight)
    if dtype is None:
        return None
    cached = _cached(conv, bn)
    if cached is None:
        return None
    return frozen_cpu.frozen_conv_bn_act(conv, cached[0], cached[1], x, residual, activation, dtype,
                                         overwrite_residual)


def _cached(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple | None:
    """(folded arguments, packed weights) of a frozen eval bn wanting no gradient, folded
    again when a tensor changed; None where the pair must run unfrozen."""
    if not is_frozen(bn) or bn.training or bn.running_mean is None or not bn.track_running_stats:
        return None
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    key = _key(tensors, bn.eps)
    if key is None:
        return None
    cached = getattr(bn, _ATTR)
    if cached is not None and cached[0] == key:
        return cached[1:]
    with torch.no_grad():
        arguments = _fold(conv.weight, conv.bias, bn)
    cached = (key, arguments, frozen_cpu.PackedWeights())
    setattr(bn, _ATTR, cached)
    return cached[1:]


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
