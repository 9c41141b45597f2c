"""Fused ops applied to existing torch modules, so that networks can keep torchvision's
module names (conv1, bn1, ...) and still run the fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from cnnkernels.nn._batch_norm_state import batch_norm_mode
from cnnkernels.nn.freeze import folded_eval_arguments, is_frozen, run_frozen_cpu
from cnnkernels.nn.sync_batchnorm import sync_batch_norm, sync_group
from cnnkernels.ops.bn_act_conv import bn_act_conv
from cnnkernels.ops.conv_bn_act import conv_bn_act


def check_zero_padding(conv: nn.Conv2d) -> None:
    """The fused ops take integer zero padding only."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fused conv needs integer zero padding, got padding={conv.padding!r} "
                         f"padding_mode={conv.padding_mode!r}")


def check_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_over: str) -> None:
    """conv takes integer zero padding and bn normalises its "input" or "output" channels."""
    check_zero_padding(conv)
    channels = conv.in_channels if bn_over == "input" else conv.out_channels
    if bn.num_features != channels:
        raise ValueError(f"bn has {bn.num_features} features but conv has {channels} {bn_over} channels")


def assemble(cls: type[nn.Module], children: dict[str, nn.Module | None], attributes: dict | None = None):
    """A new `cls` instance (its __init__ not run) holding the given submodules (shared, in
    the given order, None allowed) and plain attributes, in training mode."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, child in children.items():
        setattr(module, key, child)
    for key, value in (attributes or {}).items():
        setattr(module, key, value)
    return module


def conv_bn_act_modules(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor,
                        residual: torch.Tensor | None = None, activation: str = "relu",
                        overwrite_residual: bool = False) -> torch.Tensor:
    """act(bn(conv(x)) + residual) with the modules' parameters and buffers, fused; same
    results and running-statistics updates as calling the modules in turn. A bn marked by
    cnnkernels.nn.freeze runs with its folded weights cached (cnnkernels/nn/freeze.py), on
    the CPU in channels_last as one prepacked oneDNN call (cnnkernels/nn/frozen_cpu.py). A
    synchronised bn (cnnkernels.nn.convert_sync_batchnorm) in training runs conv, the
    synchronised BatchNorm, the add and the activation as torch ops. overwrite_residual: the
    caller does not read `residual` afterwards, so the frozen CPU path may write the result
    into it (no other path does)."""
    if is_frozen(bn):
        out = run_frozen_cpu(conv, bn, x, residual, activation, overwrite_residual)
        if out is not None:
            return out
    check_zero_padding(conv)
    training, momentum, running_mean, running_var = batch_norm_mode(bn)
    group = sync_group(bn)
    if group is not None:
        out = sync_batch_norm(_conv(conv, x), bn, momentum, group)
        return _activate(out if residual is None else out + residual, activation)
    folded = None if training else folded_eval_arguments(conv, bn, x)
    if folded is not None:
        weight, bias, bn_weight, bn_bias, folded_mean, folded_var, eps = folded
        return conv_bn_act(x, weight, bias, bn_weight, bn_bias, folded_mean, folded_var, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, training=False,
                           eps=eps, residual=residual, activation=activation)
    return conv_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, running_mean, running_var,
                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       training=training, momentum=momentum, eps=bn.eps, residual=residual,
                       activation=activation)


def bn_act_conv_modules(bn: nn.BatchNorm2d, conv: nn.Conv2d, x: torch.Tensor, activation: str = "relu",
                        out: torch.Tensor | None = None, update_running_stats: bool = True) -> torch.Tensor:
    """conv(act(bn(x))) with the modules' parameters and buffers, fused; same results and
    running-statistics updates as calling the modules in turn. [N, C_in, H, W] ->
    [N, C_out, H_out, W_out] (written into `out` when given; see ops.bn_act_conv).
    update_running_stats=False: a second use of the same bn(x) (one pre-activation feeding
    two convolutions): batch statistics in training as bn(x) would use, but neither the
    running statistics nor num_batches_tracked are touched. A synchronised bn in training
    runs the synchronised BatchNorm, the activation and conv as torch ops."""
    check_zero_padding(conv)
    if update_running_stats:
        training, momentum, running_mean, running_var = batch_norm_mode(bn)
    else:
        training, momentum = bn.training or bn.running_mean is None, 0.0
        running_mean, running_var = (None, None) if training else (bn.running_mean, bn.running_var)
    group = sync_group(bn)
    if group is not None:
        result = _conv(conv, _activate(sync_batch_norm(x, bn, momentum, group, update_running_stats), activation))
        return result if out is None else out.copy_(result)
    return bn_act_conv(x, conv.weight, conv.bias, bn.weight, bn.bias, running_mean, running_var,
                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       training=training, momentum=momentum, eps=bn.eps, activation=activation, out=out)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                      conv.groups)


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(x) if activation == "relu" else x
