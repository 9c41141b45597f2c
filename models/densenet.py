"""DenseNet-BC 121/161/169/201 (Huang et al. 2017), in torchvision's layout and keys
(features.conv0, features.norm0, features.denseblock1.denselayer1.norm1/conv1/norm2/conv2,
features.transition1.norm/conv, features.norm5, classifier).

The stem (conv0 -> norm0 -> relu0) runs as one fused conv_bn_act op (features is a
cnnkernels.nn.FusedSequential). The dense blocks are cnnkernels.nn.DenseBlock: one
feature buffer per block, each layer reading its channel-prefix view and writing its
new channels into its own slice (no torch.cat), with a lean backward (memory linear in
depth). Each transition's BatchNorm -> ReLU -> 1x1 conv runs as one fused bn_act_conv op
over its own norm and conv modules (keys transition.norm / transition.conv), then the
2x2 average pool.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels.nn import DenseBlock, FusedSequential, frozen_plan
from cnnkernels.nn.freeze import frozen_linear, is_frozen, run_frozen_cpu_bn_act_conv
from cnnkernels.nn.functional import bn_act_conv_modules

from ._init import initialize, kaiming_fan_in, zero_bias
from ._registry import register_model, with_weights

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]


class _Transition(nn.Module):
    """BN-ReLU-1x1 conv (one fused bn_act_conv op) then 2x2/2 average pool.
    [N, C_in, H, W] -> [N, C_out, H/2, W/2]. The children are torchvision's (norm, relu,
    conv, pool); `relu` is kept for the structure, the op applies the ReLU itself. In a
    frozen model on the CPU (cnnkernels.nn.freeze) the pool runs before the 1x1 conv
    instead, a quarter of its work for the same function (run_frozen_cpu_bn_act_conv)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_frozen(self.norm):
            out = run_frozen_cpu_bn_act_conv(self.norm, self.conv, x, pool=self.pool)
            if out is not None:
                return out
        return self.pool(bn_act_conv_modules(self.norm, self.conv, x))


class DenseNet(frozen_plan.ReplaysFrozenForward, nn.Module):
    """DenseNet-BC.

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: dense layers per block (4 blocks).
        num_init_features: stem conv channels.
        bn_size: bottleneck width factor (1x1 conv to bn_size * k channels).
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs.
        memory_efficient: recompute each dense layer's bottleneck output in backward
            instead of keeping it (DenseBlock's memory_efficient; the concatenation is
            in place either way).

    forward(x [N, 3, H, W]) -> [N, num_classes]; H, W >= 29 (torchvision's minimum).
    At 224x224 the blocks run at 56, 28, 14 and 7.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000, memory_efficient: bool = False) -> None:
        super().__init__()
        self.features = FusedSequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        initialize(self, conv=kaiming_fan_in, linear=zero_bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return frozen_linear(self.classifier, out)


def _densenet(growth_rate: int, block_config: tuple[int, ...], num_init_features: int, weights, **kwargs) -> DenseNet:
    return with_weights(DenseNet(growth_rate, block_config, num_init_features, **kwargs), weights)


@register_model
def densenet121(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16), 8.0M parameters at 1000 classes.
    kwargs: num_classes, bn_size, drop_rate, memory_efficient; weights: a checkpoint path
    or state_dict (torchvision keys)."""
    return _densenet(32, (6, 12, 24, 16), 64, weights, **kwargs)


@register_model
def densenet161(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels), 28.7M parameters.
    kwargs: num_classes, bn_size, drop_rate, memory_efficient; weights: a checkpoint path
    or state_dict (torchvision keys)."""
    return _densenet(48, (6, 12, 36, 24), 96, weights, **kwargs)


@register_model
def densenet169(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32), 14.1M parameters at 1000 classes.
    kwargs: num_classes, bn_size, drop_rate, memory_efficient; weights: a checkpoint path
    or state_dict (torchvision keys)."""
    return _densenet(32, (6, 12, 32, 32), 64, weights, **kwargs)


@register_model
def densenet201(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32), 20.0M parameters at 1000 classes.
    kwargs: num_classes, bn_size, drop_rate, memory_efficient; weights: a checkpoint path
    or state_dict (torchvision keys)."""
    return _densenet(32, (6, 12, 48, 32), 64, weights, **kwargs)
