"""AlexNet (Krizhevsky et al. 2012, torchvision's single-tower layout) and ZFNet (Zeiler &
Fergus 2013, "a bigger AlexNet").

AlexNet here is torchvision's: features 64-192-384-256-256 (conv1 11x11 stride 4 pad 2:
227x227 -> 64x56x56, the lecture notes' variant), 3x3/2 max pools, an adaptive 6x6
average pool and a 9216-4096-4096-num_classes classifier with dropout. The module names
and state_dict keys are torchvision's (features.0, features.3, ..., classifier.1, ...).

ZFNet is AlexNet with the two changes of the notes: conv1 7x7 stride 2 (instead of 11x11
stride 4; padding stays 2) and conv3/4/5 with 512/1024/512 filters (instead of
384/384/256); the classifier's first layer takes 512*6*6 = 18432 inputs. At 227x227:
conv1 64x113x113, pool 64x56x56, conv2 192x56x56, pool 192x27x27, conv3-5 27x27,
pool 512x13x13, adaptive pool 512x6x6.

There is no BatchNorm in either network, so nothing here is fused: conv + ReLU stays two
torch calls.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cnnkernels.nn import frozen_plan

from ._registry import register_model, with_weights

__all__ = ["AlexNet", "alexnet", "zfnet"]


class AlexNet(frozen_plan.ReplaysFrozenForward, nn.Module):
    """AlexNet-style network: five convolutions, three max pools, three linear layers.

    Args:
        num_classes: outputs of the last linear layer.
        dropout: dropout probability before the first two linear layers.
        widths: output channels of conv1..conv5 (AlexNet: 64, 192, 384, 256, 256).
        conv1: (kernel_size, stride, padding) of conv1 (AlexNet: 11, 4, 2).

    forward(x [N, 3, H, W]) -> logits [N, num_classes]; any H, W >= 63 works for
    AlexNet's conv1 (the 6x6 adaptive pool fixes the classifier's input size).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5,
                 widths: Sequence[int] = (64, 192, 384, 256, 256),
                 conv1: tuple[int, int, int] = (11, 4, 2)) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths must list 5 conv widths, got {tuple(widths)}")
        c1, c2, c3, c4, c5 = widths
        kernel, stride, padding = conv1
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=kernel, stride=stride, padding=padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c5 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _build(weights, **kwargs) -> AlexNet:
    return with_weights(AlexNet(**kwargs), weights)


@register_model
def alexnet(*, weights=None, **kwargs) -> AlexNet:
    """AlexNet, torchvision's layout and keys (61.1M parameters at 1000 classes).
    Input [N, 3, 227, 227] (or 224) -> [N, num_classes]. kwargs: num_classes, dropout;
    weights: a checkpoint path or state_dict (torchvision's alexnet loads strictly)."""
    return _build(weights, **kwargs)


@register_model
def zfnet(*, weights=None, **kwargs) -> AlexNet:
    """ZFNet as in the lecture notes: AlexNet with conv1 7x7 stride 2 (padding 2) and
    conv3/4/5 of 512/1024/512 filters (107.0M parameters at 1000 classes).
    Input [N, 3, 227, 227] -> [N, num_classes]. kwargs: num_classes, dropout;
    weights: a checkpoint path or state_dict."""
    kwargs.setdefault("widths", (64, 192, 512, 1024, 512))
    kwargs.setdefault("conv1", (7, 2, 2))
    return _build(weights, **kwargs)
