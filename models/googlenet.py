"""GoogLeNet / Inception v1 (Szegedy et al. 2014), in torchvision's layout and keys.

Every BasicConv2d of torchvision (conv without bias + BatchNorm2d(eps=0.001) + ReLU) is a
cnnkernels.nn.ConvBNAct here: same `.conv` / `.bn` keys, run as one fused op. As in
torchvision (and unlike the paper) there is BatchNorm after every conv, and the "5x5"
branch of each Inception module is a 3x3 conv (torchvision issue 906), so that
torchvision state_dicts load with strict=True.

In training, with aux_logits=True, the two auxiliary classifiers (after inception4a and
inception4d) run and forward returns GoogLeNetOutputs(logits, aux_logits2, aux_logits1);
in eval, or with aux_logits=False, it returns the logits tensor. `googlenet_loss` is the
paper's total loss: CE(main) + 0.3 * (CE(aux1) + CE(aux2)).
"""
from __future__ import annotations

from collections import namedtuple
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels.nn import ConvBNAct, frozen_plan

from ._init import imagenet_to_unit_range, initialize, trunc_normal
from ._registry import register_model, with_weights

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "Inception", "InceptionAux", "googlenet", "googlenet_loss"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
GoogLeNetOutputs.__doc__ = "GoogLeNet's training outputs: main logits, aux2 logits (after 4d), aux1 logits (after 4a)."

_conv = partial(ConvBNAct, eps=0.001)


class Inception(nn.Module):
    """Inception module with dimension reductions: concat of 1x1 | 1x1 -> 3x3 |
    1x1 -> 3x3 (the "5x5" branch, 3x3 as in torchvision) | 3x3/1 max pool -> 1x1.
    [N, in_channels, H, W] -> [N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W]."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int) -> None:
        super().__init__()
        self.branch1 = _conv(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(_conv(in_channels, ch3x3red, kernel_size=1),
                                     _conv(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(_conv(in_channels, ch5x5red, kernel_size=1),
                                     _conv(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     _conv(in_channels, pool_proj, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 4x4 adaptive average pool -> 1x1 conv (128) -> FC 1024 ->
    ReLU -> dropout -> FC num_classes. [N, in_channels, H, W] -> [N, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.conv = _conv(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, (4, 4))
        x = torch.flatten(self.conv(x), 1)
        x = F.relu(self.fc1(x), inplace=True)
        return self.fc2(self.dropout(x))


class GoogLeNet(frozen_plan.ReplaysFrozenForward, nn.Module):
    """GoogLeNet (22 layers, 9 Inception modules), torchvision's keys.

    Args:
        num_classes: classifier outputs.
        aux_logits: build the two auxiliary classifiers (aux1, aux2); they run in training.
        transform_input: re-normalise ImageNet-normalised input to [-1, 1] per channel
            (what the ported Google weights expect), as torchvision does.
        init_weights: truncated-normal (std 0.01) convs and linear layers, unit BatchNorm.
        dropout, dropout_aux: dropout before the main and the auxiliary final layers.

    forward(x [N, 3, H, W]) -> logits [N, num_classes] (eval, or aux_logits=False), or
    GoogLeNetOutputs(logits, aux_logits2, aux_logits1) in training with aux_logits.
    224x224 gives 1024x7x7 before the global pool; inputs down to about 32x32 work.
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False,
                 init_weights: bool = True, dropout: float = 0.2, dropout_aux: float = 0.7) -> None:
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.conv1 = _conv(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = _conv(64, 64, kernel_size=1)
        self.conv3 = _conv(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)

        self.aux1: Optional[InceptionAux] = InceptionAux(512, num_classes, dropout_aux) if aux_logits else None
        self.aux2: Optional[InceptionAux] = InceptionAux(528, num_classes, dropout_aux) if aux_logits else None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:
            initialize(self, conv=trunc_normal(0.01), linear=trunc_normal(0.01))

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_to_unit_range(x) if self.transform_input else x

    def _forward(self, x: torch.Tensor):
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        with_aux = self.training and self.aux1 is not None and self.aux2 is not None
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        x = self.fc(self.dropout(x))
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet_loss(outputs, target: torch.Tensor, aux_weight: float = 0.3, **cross_entropy_kwargs) -> torch.Tensor:
    """GoogLeNet's total training loss: CE(logits) + aux_weight * (CE(aux1) + CE(aux2)).

    outputs: GoogLeNetOutputs (training with aux_logits) or a logits tensor [N, classes]
    (then only the main term); an aux entry that is None is skipped. target [N] class
    indices (or whatever F.cross_entropy accepts, with cross_entropy_kwargs such as
    label_smoothing). Returns a scalar.
    """
    if isinstance(outputs, torch.Tensor):
        return F.cross_entropy(outputs, target, **cross_entropy_kwargs)
    logits, aux2, aux1 = outputs
    loss = F.cross_entropy(logits, target, **cross_entropy_kwargs)
    for aux in (aux1, aux2):
        if aux is not None:
            loss = loss + aux_weight * F.cross_entropy(aux, target, **cross_entropy_kwargs)
    return loss


@register_model
def googlenet(*, weights=None, **kwargs) -> GoogLeNet:
    """GoogLeNet (Inception v1), 6.6M parameters without the auxiliary heads (13.0M with,
    at 1000 classes). kwargs: num_classes, aux_logits (default True), transform_input,
    init_weights, dropout, dropout_aux; weights: a checkpoint path or state_dict
    (torchvision keys; build with aux_logits=False for a checkpoint without aux heads)."""
    return with_weights(GoogLeNet(**kwargs), weights)
