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
to float32 / bfloat16 rounding, not bitwise. The same path runs DenseNet's
pre-activation units (run_frozen_cpu_bn_act_conv): each dense layer's norm2 is folded
into conv1, and a transition pools before its 1x1 convolution; a dense block then replays
its layers from a recorded plan (frozen_dense.py). A frozen nn.Linear keeps a bfloat16
copy of its weight for CPU bfloat16 autocast (frozen_linear). A model class declaring
`replays_frozen_forward` (frozen_plan.ReplaysFrozenForward, the base of every model class of
cnnkernels.models) gets a plan store: its forward then records its CPU calls once per input
signature and replays them (frozen_plan.py).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from cnnkernels.nn import cpu_memory, frozen_cpu, frozen_plan

__all__ = ["freeze", "unfreeze", "is_frozen", "folded_eval_arguments", "run_frozen_cpu",
           "run_frozen_cpu_bn_act_conv", "frozen_linear"]

# On each BatchNorm2d and Conv2d of a frozen model: {role: (key, cached value)}, empty
# until the first call. Roles: "conv_bn" on a BatchNorm (the folded arguments of the conv
# before it and their frozen_cpu.PackedWeights), "conv" on a convolution with no
# BatchNorm after it (its own weight and bias, packed).
_ATTR = "_cnnkernels_freeze"
_PLANS = "_cnnkernels_dense_plans"  # on a DenseBlock: its recorded plans (frozen_dense.py)


def freeze(model: nn.Module, retain_freed_memory: bool = True) -> nn.Module:
    """Marks every BatchNorm2d, Conv2d and Linear of model (the model itself included)
    frozen, and gives every module whose class declares replays_frozen_forward an empty
    plan store (frozen_plan.py); returns model.

    retain_freed_memory: for a model with CPU parameters or buffers, also keep freed CPU
    memory in the process for reuse (cnnkernels.nn.cpu_memory.retain_freed_cpu_memory, a
    process-wide glibc malloc setting): the activations of each call then reuse the last
    call's pages instead of page-faulting in fresh ones (frozen ResNet-50, batch 8, 2
    threads, AVX2: 13,000 faults and about 4% of each forward; DenseNet-121 about 12%).
    The process's resident memory then stays at its peak. False leaves malloc as it is;
    so does a user's own allocator choice (LD_PRELOAD, MALLOC_* variables)."""
    _check_module(model)
    if not isinstance(retain_freed_memory, bool):
        raise TypeError(f"retain_freed_memory must be a bool, got {retain_freed_memory!r}")
    if retain_freed_memory and any(t.device.type == "cpu" for t in _tensors(model)):
        cpu_memory.retain_freed_cpu_memory()
    inference = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_inference()]
    if inference:
        warnings.warn(
            f"cnnkernels.nn.freeze: {len(inference)} parameters and buffers of this model ({inference[0]}, ...) are "
            "inference tensors (made or copied under torch.inference_mode, e.g. by copy.deepcopy there): they have "
            "no version counter to key the folded and packed weights on, so no convolution takes the frozen path "
            "(nor is the forward replayed). Build or copy the model outside inference_mode (torch.no_grad is "
            "fine).",
            RuntimeWarning, stacklevel=2)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.Conv2d, nn.Linear)):
            setattr(module, _ATTR, {})
        if getattr(type(module), frozen_plan.REPLAYS_ATTR, False):
            frozen_plan.enable(module)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undoes freeze(model): drops every cached folded or packed weight; returns model."""
    _check_module(model)
    for module in model.modules():
        for attr in (_ATTR, _PLANS, frozen_plan.PLANS_ATTR):
            module.__dict__.pop(attr, None)
    return model


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def is_frozen(module: nn.Module) -> bool:
    return hasattr(module, _ATTR)


def packed_weights(module: nn.Module) -> frozen_cpu.PackedWeights | None:
    """The packed weights cached on a frozen BatchNorm (for the conv before it) or Conv2d
    (for itself, with no BatchNorm after it); None before the first packed call."""
    memo = getattr(module, _ATTR, None) or {}
    entry = memo.get("conv_bn" if isinstance(module, nn.BatchNorm2d) else "conv")
    return None if entry is None else entry[1][1]


def _key(tensors, eps: float):
    # A replaced tensor (another dtype or device included) has another data_ptr.
    try:
        return [None if t is None else (t.data_ptr(), t._version) for t in tensors] + [eps]
    except RuntimeError:  # inference tensors carry no version counter: never cache them
        return None


def _wants_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _memo(module: nn.Module, role: str, tensors, eps: float, build):
    """build()'s value, cached on the frozen module under `role` and built again when any
    of `tensors` changed; None (nothing cached) when the module is not frozen, a tensor
    wants its gradient or cannot be keyed."""
    memo = getattr(module, _ATTR, None)
    if memo is None or _wants_grad(tensors):
        return None
    key = _key(tensors, eps)
    if key is None:
        return None
    entry = memo.get(role)
    if entry is not None and entry[0] == key:
        return entry[1]
    with torch.no_grad():
        value = build()
    memo[role] = (key, value)
    return value


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


def _packable(conv: nn.Conv2d, activation: str) -> bool:
    return activation in ("relu", "none") and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def run_frozen_cpu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None,
                   activation: str, overwrite_residual: bool = False) -> torch.Tensor | None:
    """act(bn(conv(x)) + residual) through frozen_cpu's prepacked oneDNN call for a frozen
    bn, where its conditions hold; None to take the other paths."""
    if not _packable(conv, activation) or not frozen_cpu.applies(x, residual):
        return None
    dtype = frozen_cpu.compute_dtype(x, conv.weight)
    if dtype is None:
        return None
    cached = _cached(conv, bn)
    if cached is None:
        return None
    return frozen_cpu.frozen_conv_bn_act(conv, cached[0], cached[1], x, residual, activation, dtype,
                                         overwrite_residual, frozen_cpu.result_dtype(x))


def run_frozen_cpu_bn_act_conv(bn: nn.BatchNorm2d | None, conv: nn.Conv2d, x: torch.Tensor,
                               activation: str = "relu", then_bn: nn.BatchNorm2d | None = None,
                               pool: nn.AvgPool2d | None = None,
                               scratch: torch.Tensor | None = None, rounded: bool = True,
                               dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The pre-activation unit conv(act(bn(x))) of a frozen model on frozen_cpu's path:
    act(bn(x)) as one addcmul and an in-place activation (bn None: x as it is, no
    activation applied), then the
    packed convolution. then_bn: a BatchNorm right after the convolution, followed by ReLU
    (DenseNet's norm2 -> relu2): folded into the packed convolution, so the result is
    relu(then_bn(conv(act(bn(x))))). pool: an unpadded AvgPool2d after the convolution
    (DenseNet's transition), applied before it instead, which is the same function for a
    1x1 stride-1 convolution (averaging commutes with a per-pixel affine map) at a quarter
    of the convolution's work; results agree to rounding. scratch: a flat tensor of at
    least x.numel() elements of the compute dtype to hold act(bn(x)) (spares allocating
    it per call). rounded: the result in the dtype the op yields (frozen_cpu.result_dtype);
    False leaves it in the compute dtype (a DenseNet layer's bottleneck and new features,
    read by the next convolution or copied into the block's buffer). dtype: the compute
    dtype, where the caller has it (conv2 of a DenseNet layer takes conv1's unrounded
    result); None: frozen_cpu.compute_dtype's. [N, C_in, H, W]
    (channels_last, or a channel-prefix view of a channels_last tensor) -> [N, C_out, H',
    W'] channels_last; None where the conditions
    of frozen_cpu do not hold (bn and then_bn eval and frozen, C_in channels, no gradient
    wanted) and the caller's plain path runs."""
    if not _packable(conv, activation) or not frozen_cpu.applies(x, None, views=bn is not None):
        return None
    if x.shape[1] != conv.in_channels or (pool is not None and not _pool_commutes(pool, conv)):
        return None
    if dtype is None:
        dtype = frozen_cpu.compute_dtype(x, conv.weight)
    if dtype is None:
        return None
    if bn is not None:
        if not _eval_stats(bn) or x.shape[1] != bn.num_features:
            return None
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        scale_shift = _memo(bn, "bn_act", tensors, bn.eps, lambda: frozen_cpu.scale_shift(bn))
        if scale_shift is None:
            return None
    if then_bn is None:
        cached = _memo(conv, "conv", (conv.weight, conv.bias), 0.0,
                       lambda: ((conv.weight, None, None, conv.bias), frozen_cpu.PackedWeights()))
    else:
        cached = _cached(conv, then_bn)
    if cached is None:
        return None
    if bn is not None:
        out = None
        if scratch is not None and scratch.dtype == dtype and scratch.numel() >= x.numel():
            n, c, h, w = x.shape
            out = scratch[:x.numel()].view(n, h, w, c).permute(0, 3, 1, 2)
        z = frozen_cpu.bn_act(scale_shift, x, dtype, activation, out)
    else:
        z = x.to(dtype)
    if pool is not None:
        z = pool(z)
    return frozen_cpu.frozen_conv_bn_act(conv, cached[0], cached[1], z, None, "none" if then_bn is None else "relu",
                                         dtype, out_dtype=frozen_cpu.result_dtype(x) if rounded else None)


def _eval_stats(bn: nn.BatchNorm2d) -> bool:
    return not bn.training and bn.running_mean is not None and bn.track_running_stats


def _pool_commutes(pool: nn.Module, conv: nn.Conv2d) -> bool:
    return (type(pool) is nn.AvgPool2d and pool.padding in (0, (0, 0)) and pool.divisor_override is None
            and tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0))


def _cached(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple | None:
    """(folded arguments, packed weights) of a frozen eval bn wanting no gradient, folded
    again when a tensor changed; None where the pair must run unfrozen."""
    if not _eval_stats(bn):
        return None
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return _memo(bn, "conv_bn", tensors, bn.eps,
                 lambda: (_fold(conv.weight, conv.bias, bn), frozen_cpu.PackedWeights()))


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


def frozen_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) [N, in_features] -> [N, out_features]. For a frozen linear under CPU
    bfloat16 autocast with no gradient wanted, its weight and bias are cast to bfloat16
    once (kept, and cast again when they change) instead of on every call, which costs
    about 0.4 ms per call for ResNet-50's 2048 x 1000 classifier: the same values as
    autocast's per-call cast. Otherwise (or with a hook on linear) linear(x) as it is."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not is_frozen(linear)
            or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16
            or torch.compiler.is_compiling() or frozen_cpu.hooked((linear,))):
        return linear(x)
    weight, bias = linear.weight, linear.bias
    cached = _memo(linear, "linear_bf16", (weight, bias), 0.0,
                   lambda: tuple(None if t is None else t.to(torch.bfloat16) for t in (weight, bias)))
    if cached is None or (x.requires_grad and torch.is_grad_enabled()):
        return linear(x)
    with torch.autocast("cpu", enabled=False):
        return torch.nn.functional.linear(x.to(torch.bfloat16), *cached)

