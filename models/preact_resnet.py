"""Pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each residual unit is BN-ReLU-conv, BN-ReLU-conv (BasicBlock) or three such units
(Bottleneck, the stride on the 3x3), and the sum with the shortcut is not activated,
so the identity path runs untouched from the stem to the head. The ImageNet layout
follows the authors' fb.resnet.torch preresnet: a 7x7/2 Conv-BN-ReLU stem (fused, one
conv_bn_act op) and 3x3/2 max-pool; the first unit of the first stage gets no
pre-activation of its own (the stem ends with BN-ReLU); the first unit of every other
stage pre-activates its input once and feeds it to both its residual branch and its
projection shortcut (a bare 1x1 conv with the stride, no BN); all other units take the
raw input as shortcut; after the last stage a final BN-ReLU (`final_bn`), global
average pool and fc.

Every BN-ReLU-conv of the blocks runs as one fused cnnkernels bn_act_conv op over the
block's own nn.BatchNorm2d and nn.Conv2d modules (cnnkernels.nn.functional.bn_act_conv_modules), so the
keys stay those of the plain modules. Where one pre-activation feeds two convolutions
(conv1 and the projection shortcut), each is its own bn_act_conv op over the same BN
(`shared_bn_act_convs`): the first updates the running statistics and
num_batches_tracked, the second normalises with the batch statistics of the same x
(training) or the running statistics (eval) and updates nothing; relu(bn(x)) is never
materialised and BN is applied as by one call. Each residual sum is one add_act op with
activation "none" (no activation follows it; the next unit's BN does). Plain torch
remains where no fused op fits: the first unit's conv1 (and the Bottleneck's shortcut)
on the stem's output (no BN before them) and the head's BN-ReLU (followed by pooling,
not a conv).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels.nn import frozen_plan
from cnnkernels.nn.functional import bn_act_conv_modules, conv_bn_act_modules
from cnnkernels.ops import add_act

from ._init import initialize, kaiming_fan_out
from ._registry import register_model, with_weights
from .resnet import _batch_norm, conv1x1, conv3x3

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet", "shared_bn_act_convs",
           "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152"]


def shared_bn_act_convs(bn: nn.BatchNorm2d, convs: tuple[nn.Conv2d, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """[conv(relu(bn(x))) for conv in convs], each one fused bn_act_conv op with the
    modules' parameters and buffers: x [N, C_in, H, W] -> one [N, C_out, H_out, W_out]
    per conv. BN behaves as one bn(x) call: the first op updates the running statistics
    (and num_batches_tracked), the others normalise alike and update nothing."""
    return [bn_act_conv_modules(bn, conv, x, update_running_stats=i == 0) for i, conv in enumerate(convs)]


class _PreActBlock(nn.Module):
    """Shared forward: the shortcut and the first unit, then the block's remaining units
    (the subclass's `_units`), then the (unactivated) sum with the shortcut."""

    def _check_downsample(self, downsample: nn.Module | None, preact: bool) -> None:
        if preact and downsample is not None and not isinstance(downsample, nn.Conv2d):
            raise TypeError(f"a pre-activated block's projection shortcut shares its BN-ReLU with conv1 and runs "
                            f"as a fused bn_act_conv op: downsample must be an nn.Conv2d, got "
                            f"{type(downsample).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn1 is None:  # first unit of the network: the stem already ends with BN-ReLU
            identity = x if self.downsample is None else self.downsample(x)
            out = self.conv1(x)
        elif self.downsample is not None:  # pre-activation shared with the projection shortcut
            out, identity = shared_bn_act_convs(self.bn1, (self.conv1, self.downsample), x)
        else:
            identity = x
            out = bn_act_conv_modules(self.bn1, self.conv1, x)
        return add_act(self._units(out), identity, activation="none")


class PreActBasicBlock(_PreActBlock):
    """BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3, plus the shortcut (not activated).

    x [N, inplanes, H, W] -> [N, planes, H/stride, W/stride]. preact=False leaves out
    bn1 (the first block after the stem); downsample is the projection shortcut (a
    1x1 conv) applied to the pre-activated input, or None for the identity.
    """

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 preact: bool = True, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self.bn1 = _batch_norm(norm_layer, inplanes) if preact else None
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = _batch_norm(norm_layer, planes)
        self.conv2 = conv3x3(planes, planes)
        self._check_downsample(downsample, preact)
        self.downsample = downsample
        self.stride = stride

    def _units(self, out: torch.Tensor) -> torch.Tensor:
        return bn_act_conv_modules(self.bn2, self.conv2, out)


class PreActBottleneck(_PreActBlock):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1 (x4), plus the shortcut.

    x [N, inplanes, H, W] -> [N, planes * 4, H/stride, W/stride]. preact and
    downsample as in PreActBasicBlock.
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 preact: bool = True, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self.bn1 = _batch_norm(norm_layer, inplanes) if preact else None
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = _batch_norm(norm_layer, planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = _batch_norm(norm_layer, planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self._check_downsample(downsample, preact)
        self.downsample = downsample
        self.stride = stride

    def _units(self, out: torch.Tensor) -> torch.Tensor:
        return bn_act_conv_modules(self.bn3, self.conv3, bn_act_conv_modules(self.bn2, self.conv2, out))


class PreActResNet(frozen_plan.ReplaysFrozenForward, nn.Module):
    """Pre-activation ResNet for ImageNet-style inputs (see the module docstring).

    x [N, 3, H, W] -> logits [N, num_classes]. Keys: conv1, bn1 (stem), layerL.B.{bn1,
    conv1, bn2, conv2[, bn3, conv3]}, layerL.0.downsample (1x1 conv), final_bn, fc.
    Initialisation as torchvision's ResNet: kaiming-normal fan_out convolutions, BN
    gamma 1 / beta 0, nn.Linear's default.
    """

    def __init__(self, block: type[PreActBasicBlock | PreActBottleneck], layers: list[int], num_classes: int = 1000,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _batch_norm(norm_layer, self.inplanes)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1, first_stage=True)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.final_bn = _batch_norm(norm_layer, 512 * block.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        initialize(self, conv=kaiming_fan_out)

    def _make_layer(self, block: type[PreActBasicBlock | PreActBottleneck], planes: int, blocks: int, stride: int,
                    first_stage: bool = False) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = conv1x1(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, stride, downsample, preact=not first_stage,
                        norm_layer=self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] -> relu(final_bn(last stage)) [N, 512 * expansion, H/32, W/32]."""
        x = self.maxpool(conv_bn_act_modules(self.conv1, self.bn1, x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.relu(self.final_bn(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def _build(block, layers, weights, **kwargs) -> PreActResNet:
    return with_weights(PreActResNet(block, layers, **kwargs), weights)


@register_model
def preact_resnet18(*, weights=None, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-18 (PreActBasicBlock, [2, 2, 2, 2]). kwargs go to PreActResNet
    (num_classes, norm_layer); weights: a checkpoint path or state_dict."""
    return _build(PreActBasicBlock, [2, 2, 2, 2], weights, **kwargs)


@register_model
def preact_resnet34(*, weights=None, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-34 (PreActBasicBlock, [3, 4, 6, 3]). Arguments as preact_resnet18."""
    return _build(PreActBasicBlock, [3, 4, 6, 3], weights, **kwargs)


@register_model
def preact_resnet50(*, weights=None, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-50 (PreActBottleneck, [3, 4, 6, 3]). Arguments as preact_resnet18."""
    return _build(PreActBottleneck, [3, 4, 6, 3], weights, **kwargs)


@register_model
def preact_resnet101(*, weights=None, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-101 (PreActBottleneck, [3, 4, 23, 3]). Arguments as preact_resnet18."""
    return _build(PreActBottleneck, [3, 4, 23, 3], weights, **kwargs)


@register_model
def preact_resnet152(*, weights=None, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-152 (PreActBottleneck, [3, 8, 36, 3]). Arguments as preact_resnet18."""
    return _build(PreActBottleneck, [3, 8, 36, 3], weights, **kwargs)
