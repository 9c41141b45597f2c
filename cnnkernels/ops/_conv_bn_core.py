"""What conv_bn_act (conv -> BN -> act) and bn_act_conv (BN -> act -> conv) share: the
checks of the convolution and BatchNorm arguments, and the running-statistics update.
Each error names the argument and what was expected."""
from __future__ import annotations

import numbers

import torch

from cnnkernels import reference
from cnnkernels.ops import _checks


def check_conv_bn(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                  groups, training, eps, activation, *, bn_over: str) -> tuple[list, list, list, list]:
    """Checks a fused convolution + BatchNorm call; bn_over is "output" (BN over the
    convolution's C_out channels, conv_bn_act) or "input" (over x's C_in channels,
    bn_act_conv). Returns (stride, padding, dilation, output shape) as lists, dilation as
    _checks.effective_dilation gives it."""
    stride = _checks.pair(stride, "stride")
    padding = _checks.pair(padding, "padding")
    dilation = _checks.pair(dilation, "dilation")
    _checks.check_positive(stride, "stride")
    _checks.check_positive(padding, "padding", minimum=0)
    _checks.check_positive(dilation, "dilation")
    _checks.check_activation(activation, reference.ACTIVATIONS)
    _checks.check_tensor(x, "x", ndim=4)
    _checks.check_tensor(weight, "weight", ndim=4)
    _checks.check_like(weight, "weight", x)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide both x's channels ({c_in}) and weight's output channels "
                         f"({c_out})")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"x has {c_in} channels but weight expects {weight.shape[1]} x groups={groups} = "
                         f"{weight.shape[1] * groups} (weight shape {tuple(weight.shape)})")
    if bias is not None:
        _checks.check_tensor(bias, "bias", ndim=1)
        _checks.check_like(bias, "bias", x)
        if bias.numel() != c_out:
            raise ValueError(f"bias must have {c_out} elements (one per output channel), got {bias.numel()}")
    bn_channels, what = (c_out, "output channel") if bn_over == "output" else (c_in, "channel of x")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _checks.check_per_channel(t, name, bn_channels, x, what)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    out_shape = reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(f"the kernel {tuple(weight.shape[2:])} (dilation {dilation}) does not fit the "
                         f"padded input {tuple(x.shape[2:])} (padding {padding})")
    normalised = out_shape if bn_over == "output" else list(x.shape)
    if training and normalised[0] * normalised[2] * normalised[3] < 2:
        raise ValueError(f"training needs more than 1 value per channel, got "
                         f"{'output' if bn_over == 'output' else 'x of'} shape {tuple(normalised)}")
    return list(stride), list(padding), _checks.effective_dilation(weight.shape[2:], dilation), out_shape


def check_momentum(momentum) -> None:
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
        raise TypeError(f"momentum must be a float, got {momentum!r} (the modules take momentum=None for a "
                        "cumulative average)")


@torch.no_grad()
def update_running_stats(running_mean, running_var, save_mean, save_var, normalised: torch.Tensor, momentum):
    """running = (1 - momentum) * running + momentum * batch statistic, with the unbiased
    variance of the batch, as nn.BatchNorm2d does; `normalised` is the tensor BN ran over."""
    count = normalised.numel() // normalised.shape[1]
    running_mean.lerp_(save_mean.to(running_mean.dtype), momentum)
    running_var.lerp_((save_var * (count / (count - 1))).to(running_var.dtype), momentum)
