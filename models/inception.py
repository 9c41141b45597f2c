"""Inception v2 (BN-Inception, Ioffe & Szegedy 2015) and Inception v3 (Szegedy et al. 2015).

inception_v3 is torchvision's Inception3: same modules and state_dict keys (Conv2d_1a_3x3,
Mixed_5b.branch1x1, ..., AuxLogits.fc, fc), BatchNorm eps 0.001. Every BasicConv2d of
torchvision (conv without bias + BN + ReLU) is a cnnkernels.nn.ConvBNAct here, i.e. one
fused op with the same `.conv` / `.bn` keys.

bn_inception has no torchvision twin. It follows the Inception table of the BN paper
(Figure 5): GoogLeNet with BatchNorm after every convolution, every 5x5 replaced by two
stacked 3x3 ("double 3x3" branch), average pooling in most modules, and two stride-2
modules (3c, 4e) whose pooling branch passes its input through. The per-branch widths
are the table's; note that they make 4c and 4d output 608 channels and 4e 1056 (the
table's depth column says 576 and 1024; the Caffe/TSN port agrees with the per-branch
numbers used here). The first convolution is a plain 7x7/2 conv, as in that port.
Following section 4.2.1 of the paper ("remove dropout"), dropout defaults to 0, and
there are no auxiliary classifiers. Module names follow torchvision's GoogLeNet.
"""
from __future__ import annotations

from collections import namedtuple
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels.nn import ConvBNAct, frozen_plan

from ._init import imagenet_to_unit_range, initialize, kaiming_fan_out, normal, trunc_normal
from ._registry import register_model, with_weights

__all__ = ["BNInception", "BNInceptionBlock", "BN_INCEPTION_BLOCKS", "Inception3", "InceptionOutputs",
           "bn_inception", "inception_v3"]

# --- Inception v2 (BN-Inception) ----------------------------------------------------------

# name: (#1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, pool proj, stride)
# pool proj 0 = the pooled input is passed through; #1x1 0 = no 1x1 branch.
BN_INCEPTION_BLOCKS = {
    "inception3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "inception3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "inception3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "inception4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "inception4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "inception4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "inception4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "inception4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "inception5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "inception5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


class BNInceptionBlock(nn.Module):
    """One BN-Inception module: concat of [1x1] | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 |
    3x3 pool [-> 1x1 proj]. With stride 2 the 3x3 convs that end a branch and the pool
    have stride 2 and there is no 1x1 branch. Every conv is ConvBNAct (BN + ReLU, fused).
    Pools are 3x3 with padding 1 (the Caffe port pools stride-2 without padding, in
    ceil mode; padding 1 keeps the branches the same size at every input size).
    [N, in_channels, H, W] -> [N, out_channels, H / stride, W / stride] (rounded up)."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, dbl3x3red: int,
                 dbl3x3: int, pool: str, pool_proj: int, stride: int = 1) -> None:
        super().__init__()
        conv = partial(ConvBNAct, bias=False)
        self.branch1 = conv(in_channels, ch1x1, 1) if ch1x1 else None
        self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3, stride, 1))
        self.branch3 = nn.Sequential(conv(in_channels, dbl3x3red, 1), conv(dbl3x3red, dbl3x3, 3, 1, 1),
                                     conv(dbl3x3, dbl3x3, 3, stride, 1))
        pooling = nn.AvgPool2d(3, stride, 1) if pool == "avg" else nn.MaxPool2d(3, stride, 1)
        self.branch4 = nn.Sequential(pooling, conv(in_channels, pool_proj, 1)) if pool_proj else nn.Sequential(pooling)
        self.out_channels = ch1x1 + ch3x3 + dbl3x3 + (pool_proj or in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x)] if self.branch1 is not None else []
        branches += [self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


class BNInception(frozen_plan.ReplaysFrozenForward, nn.Module):
    """BN-Inception (Inception v2 of the BN paper): stem 7x7/2 conv, 3x3/2 max pool,
    1x1 + 3x3 convs, 3x3/2 max pool, ten Inception modules (BN_INCEPTION_BLOCKS), global
    average pool, dropout, linear. Shapes at 224x224: 192x28x28 after the stem, 576x14x14
    after 3c, 1024x7x7 after 5b. forward(x [N, 3, H, W]) -> [N, num_classes]; H, W >= 32.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = ConvBNAct(64, 64, 1)
        self.conv3 = ConvBNAct(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels = 192
        for name, spec in BN_INCEPTION_BLOCKS.items():
            block = BNInceptionBlock(channels, *spec)
            self.add_module(name, block)
            channels = block.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels, num_classes)
        if init_weights:
            initialize(self, conv=kaiming_fan_out, linear=normal(0.01))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        for name in BN_INCEPTION_BLOCKS:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def _build(cls, weights, **kwargs) -> nn.Module:
    return with_weights(cls(**kwargs), weights)


@register_model
def bn_inception(*, weights=None, **kwargs) -> BNInception:
    """BN-Inception / Inception v2 (Ioffe & Szegedy 2015). Input [N, 3, 224, 224].
    kwargs: num_classes, dropout (default 0), init_weights; weights: a checkpoint path
    or state_dict of this model."""
    return _build(BNInception, weights, **kwargs)


# --- Inception v3 (torchvision's Inception3) ----------------------------------------------

InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])
InceptionOutputs.__doc__ = "Inception v3's training outputs: main logits and the auxiliary classifier's logits."

_conv = partial(ConvBNAct, eps=0.001)


class InceptionA(nn.Module):
    """35x35 module: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1.
    [N, C, H, W] -> [N, 224 + pool_features, H, W]."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _conv(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _conv(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _conv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _conv(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 grid reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2.
    [N, C, H, W] -> [N, 480 + C, (H - 3) / 2 + 1, ...]."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _conv(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _conv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 module with factorised 7x7 (1x7 and 7x1) convolutions.
    [N, C, H, W] -> [N, 768, H, W]."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _conv(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _conv(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _conv(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _conv(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17 -> 8 grid reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2.
    [N, C, H, W] -> [N, 512 + C, (H - 3) / 2 + 1, ...]."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _conv(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _conv(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 module with expanded filter banks (1x3 and 3x1 side by side).
    [N, C, H, W] -> [N, 2048, H, W]."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _conv(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _conv(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _conv(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _conv(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 grid: avg pool 5x5/3 -> 1x1 conv 128 -> 5x5 conv
    768 -> global average pool -> linear. [N, C, 17, 17] -> [N, num_classes]; needs a
    grid of at least 17x17 (inputs of about 299x299)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = _conv(in_channels, 128, kernel_size=1)
        self.conv1 = _conv(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, kernel_size=5, stride=3)
        x = self.conv1(self.conv0(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.fc(x)


class Inception3(frozen_plan.ReplaysFrozenForward, nn.Module):
    """Inception v3, torchvision's layout and keys.

    Args:
        num_classes: classifier outputs.
        aux_logits: build the auxiliary classifier (AuxLogits); it runs in training.
        transform_input: re-normalise ImageNet-normalised input to [-1, 1] per channel.
        init_weights: torchvision's init (truncated normal, std 0.1; 0.001 for the aux fc).
        dropout: dropout before the final linear layer.

    forward(x [N, 3, H, W]) -> logits [N, num_classes] (eval, or aux_logits=False), or
    InceptionOutputs(logits, aux_logits) in training with aux_logits. 299x299 is the
    design size (2048x8x8 before the pool); H, W >= 75 work without the aux head.
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False,
                 init_weights: bool = True, dropout: float = 0.5) -> None:
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = _conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _conv(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _conv(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.AuxLogits: Optional[InceptionAux] = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)
        if init_weights:
            initialize(self, conv=trunc_normal(0.1), linear=trunc_normal(0.1))
            if self.AuxLogits is not None:
                nn.init.trunc_normal_(self.AuxLogits.fc.weight, mean=0.0, std=0.001, a=-2, b=2)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_to_unit_range(x) if self.transform_input else x

    def _forward(self, x: torch.Tensor):
        x = self._transform_input(x)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        aux = self.AuxLogits(x) if self.training and self.AuxLogits is not None else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        x = torch.flatten(self.dropout(self.avgpool(x)), 1)
        x = self.fc(x)
        if self.training and self.aux_logits:
            return InceptionOutputs(x, aux)
        return x


@register_model
def inception_v3(*, weights=None, **kwargs) -> Inception3:
    """Inception v3, torchvision's layout and keys, 27.2M parameters at 1000 classes
    (aux head included). Input [N, 3, 299, 299]. kwargs: num_classes, aux_logits
    (default True), transform_input, init_weights, dropout; weights: a checkpoint path
    or state_dict (torchvision keys)."""
    return _build(Inception3, weights, **kwargs)
