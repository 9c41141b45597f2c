"""VGG 11/13/16/19 (Simonyan & Zisserman 2014) and their BatchNorm variants, in
torchvision's layout: same modules, indices and state_dict keys (features.0.weight,
features.1.running_mean, ..., classifier.6.bias), same initialisation.

All convolutions are 3x3 stride 1 pad 1, all pools 2x2 stride 2, channels double after
each pool (64-128-256-512-512). In the _bn variants each conv -> bn -> relu triple of
`features` runs as one fused conv_bn_act op (cnnkernels.nn.FusedSequential);
the plain variants have no BatchNorm and run conv and ReLU as torch calls.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from cnnkernels.nn import FusedSequential, frozen_plan

from ._init import initialize, kaiming_fan_out_zero_bias, normal
from ._registry import register_model, with_weights

__all__ = ["VGG", "CONFIGS", "make_layers", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
           "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

# Conv widths per layer, "M" for a 2x2/2 max pool (configurations A, B, D, E of the paper).
CONFIGS: dict[str, list[Union[str, int]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


def make_layers(cfg: Sequence[Union[str, int]], batch_norm: bool = False) -> nn.Sequential:
    """VGG's `features`: for each width a 3x3 conv (+ BatchNorm2d) + ReLU, for each "M" a
    2x2/2 max pool, indexed like torchvision's. Returns a FusedSequential (an
    nn.Sequential whose conv/bn/relu triples run fused) when batch_norm, else a plain
    nn.Sequential. [N, 3, H, W] -> [N, last width, H/32, W/32]."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
        in_channels = int(v)
    return FusedSequential(*layers) if batch_norm else nn.Sequential(*layers)


class VGG(frozen_plan.ReplaysFrozenForward, nn.Module):
    """VGG: `features` (see make_layers), a 7x7 adaptive average pool and a
    512*7*7-4096-4096-num_classes classifier with ReLU and dropout.

    forward(x [N, 3, H, W]) -> logits [N, num_classes]; H, W >= 32.
    init_weights applies torchvision's initialisation (Kaiming-normal fan_out convs,
    N(0, 0.01) linear layers, zero biases, unit BatchNorm).
    """

    def __init__(self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            initialize(self, conv=kaiming_fan_out_zero_bias, linear=normal(0.01))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg(cfg: str, batch_norm: bool, weights, **kwargs) -> VGG:
    return with_weights(VGG(make_layers(CONFIGS[cfg], batch_norm=batch_norm), **kwargs), weights)


@register_model
def vgg11(*, weights=None, **kwargs) -> VGG:
    """VGG-11 (configuration A), 132.9M parameters at 1000 classes. kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("A", False, weights, **kwargs)


@register_model
def vgg11_bn(*, weights=None, **kwargs) -> VGG:
    """VGG-11 with BatchNorm after every conv (fused conv-bn-relu). kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("A", True, weights, **kwargs)


@register_model
def vgg13(*, weights=None, **kwargs) -> VGG:
    """VGG-13 (configuration B), 133.0M parameters at 1000 classes. kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("B", False, weights, **kwargs)


@register_model
def vgg13_bn(*, weights=None, **kwargs) -> VGG:
    """VGG-13 with BatchNorm after every conv (fused conv-bn-relu). kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("B", True, weights, **kwargs)


@register_model
def vgg16(*, weights=None, **kwargs) -> VGG:
    """VGG-16 (configuration D), 138.4M parameters at 1000 classes. kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("D", False, weights, **kwargs)


@register_model
def vgg16_bn(*, weights=None, **kwargs) -> VGG:
    """VGG-16 with BatchNorm after every conv (fused conv-bn-relu). kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("D", True, weights, **kwargs)


@register_model
def vgg19(*, weights=None, **kwargs) -> VGG:
    """VGG-19 (configuration E), 143.7M parameters at 1000 classes. kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("E", False, weights, **kwargs)


@register_model
def vgg19_bn(*, weights=None, **kwargs) -> VGG:
    """VGG-19 with BatchNorm after every conv (fused conv-bn-relu). kwargs: num_classes,
    init_weights, dropout; weights: a checkpoint path or state_dict (torchvision keys)."""
    return _vgg("E", True, weights, **kwargs)
