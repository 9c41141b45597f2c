"""What torchvision's builders share, for the families here: the weight initialisation
initialize(model, conv=..., linear=...) visits model.modules() in order (so the random
draws are torchvision's), applies `conv` to every nn.Conv2d and `linear` to every
nn.Linear (None leaves the layer as built) and sets every norm layer's weight to 1 and
bias to 0; and the input transform of the checkpoints trained on [-1, 1] inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Init = Callable[[nn.Module], None]


def initialize(model: nn.Module, *, conv: Init, linear: Init | None = None,
               norms: tuple[type, ...] = (nn.BatchNorm2d,)) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv(m)
        elif isinstance(m, norms):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and linear is not None:
            linear(m)


def kaiming_fan_out(m: nn.Module) -> None:
    """He-normal over fan_out for ReLU (ResNet, BN-Inception); the bias as built."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def kaiming_fan_out_zero_bias(m: nn.Module) -> None:
    """kaiming_fan_out, and a bias, if any, to 0 (VGG)."""
    kaiming_fan_out(m)
    if m.bias is not None:
        nn.init.constant_(m.bias, 0)


def kaiming_fan_in(m: nn.Module) -> None:
    """He-normal with torch's defaults, fan_in (DenseNet)."""
    nn.init.kaiming_normal_(m.weight)


def zero_bias(m: nn.Module) -> None:
    nn.init.constant_(m.bias, 0)


def normal(std: float) -> Init:
    """Weight ~ N(0, std^2), bias 0."""
    def init(m: nn.Module) -> None:
        nn.init.normal_(m.weight, 0, std)
        nn.init.constant_(m.bias, 0)
    return init


def trunc_normal(std: float) -> Init:
    """Weight ~ N(0, std^2) truncated to [-2, 2] (GoogLeNet, Inception v3); the bias as built."""
    def init(m: nn.Module) -> None:
        nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2, b=2)
    return init


def imagenet_to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] normalised with ImageNet's mean and std -> normalised to [-1, 1] (mean
    and std 0.5), as torchvision's GoogLeNet and Inception v3 do with transform_input=True."""
    x0 = x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
    x1 = x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
    x2 = x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
    return torch.cat((x0, x1, x2), 1)
