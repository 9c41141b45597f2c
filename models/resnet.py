"""ResNet (He et al. 2015) and ResNeXt (Xie et al. 2017), torchvision's layout, fused.

Every Conv-BN(-ReLU) of the network runs as one cnnkernels conv_bn_act op through
cnnkernels.nn.functional.conv_bn_act_modules, which takes the existing nn.Conv2d and
nn.BatchNorm2d modules, so the modules keep torchvision's names (conv1, bn1, ...,
downsample.0, downsample.1, fc): state_dict keys and shapes are torchvision's, and a
torchvision checkpoint loads with strict=True. The residual add and the final ReLU of
each block are fused into the op of the block's last convolution; the projection
shortcut runs as the same op with activation "none".

The Bottleneck block takes an `se` switch (timm style) that inserts a Squeeze-and-
Excitation gate after bn3; models/senet.py builds SE-ResNet / SE-ResNeXt with it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cnnkernels.nn import frozen_cpu, frozen_plan
from cnnkernels.nn.freeze import frozen_linear, is_frozen
from cnnkernels.nn.frozen_cpu import hooked as _hooked
from cnnkernels.nn.functional import conv_bn_act_modules
from cnnkernels.nn.squeeze_excite import SqueezeExcite
from cnnkernels.nn.sync_batchnorm import SyncBatchNorm

from ._init import initialize, kaiming_fan_out
from ._registry import register_model, with_weights

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _batch_norm(norm_layer: Callable[..., nn.Module] | None, channels: int) -> nn.BatchNorm2d:
    module = (norm_layer or nn.BatchNorm2d)(channels)
    if not isinstance(module, nn.BatchNorm2d):
        raise TypeError(f"the fused blocks need norm_layer to build nn.BatchNorm2d modules, "
                        f"got {type(module).__name__}")
    return module


def is_conv_bn(module: nn.Module | None) -> bool:
    """Whether `module` is torchvision's projection shortcut: Sequential(Conv2d, BatchNorm2d)."""
    return (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d)
            and isinstance(module[1], (nn.BatchNorm2d, SyncBatchNorm)))


def overwritable_shortcut(downsample: nn.Module | None, consume_input: bool) -> bool:
    """Whether the block may write its output into its identity branch's tensor (the frozen
    CPU path then runs the last convolution in oneDNN's in-place sum form, as torch.compile's
    frozen graphs do, sparing a fresh output): the projection's fresh tensor always; the
    block's input x itself when the caller consumes it (ResNet.forward_features, for the
    intermediates it owns)."""
    return is_conv_bn(downsample) or (consume_input and downsample is None)


def shortcut(downsample: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """The block's identity branch: x itself, bn(conv(x)) fused for torchvision's
    Sequential(conv1x1, BatchNorm2d) projection (a fresh tensor no hook sees: the block may
    overwrite it), or any other module called as is."""
    if downsample is None:
        return x
    if is_conv_bn(downsample):
        return conv_bn_act_modules(downsample[0], downsample[1], x, activation="none")
    return downsample(x)


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN units and a shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    x [N, inplanes, H, W] -> [N, planes, H/stride, W/stride]. Same constructor and
    attribute names as torchvision.models.resnet.BasicBlock (groups must be 1 and
    base_width 64, as there); each unit runs as one fused op, the residual add and the
    last ReLU inside conv2's.
    """

    expansion: int = 1
    cnnkernels_fused = True  # cnnkernels.nn.convert leaves it alone

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = _batch_norm(norm_layer, planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = _batch_norm(norm_layer, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor, consume_input: bool = False) -> torch.Tensor:
        """consume_input: the caller's promise that nothing reads x afterwards (see
        overwritable_shortcut)."""
        identity = shortcut(self.downsample, x)
        out = conv_bn_act_modules(self.conv1, self.bn1, x)
        return conv_bn_act_modules(self.conv2, self.bn2, out, residual=identity, activation="relu",
                                   overwrite_residual=overwritable_shortcut(self.downsample, consume_input))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, groups), 1x1 expand (x4), each Conv-BN fused, and a shortcut:
    relu(se(bn3(conv3(...))) + shortcut(x)), the stride on the 3x3 (ResNet v1.5, as torchvision).

    x [N, inplanes, H, W] -> [N, planes * 4, H/stride, W/stride]; the inner width is
    planes * base_width / 64 * groups. Same constructor and attribute names as
    torchvision.models.resnet.Bottleneck, plus `se`: when True a SqueezeExcite gate
    (attribute `se`, timm's keys se.fc1 / se.fc2, `se_reduction` = 16) scales bn3's
    output before the residual add, as in timm's SE-ResNet; the add and the ReLU are
    then done by the gate's call instead of conv3's.
    """

    expansion: int = 4
    cnnkernels_fused = True  # cnnkernels.nn.convert leaves it alone

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None, se: bool = False,
                 se_reduction: int = 16) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = _batch_norm(norm_layer, width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = _batch_norm(norm_layer, width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = _batch_norm(norm_layer, planes * self.expansion)
        self.se = SqueezeExcite(planes * self.expansion, se_reduction) if se else None
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor, consume_input: bool = False) -> torch.Tensor:
        """consume_input: the caller's promise that nothing reads x afterwards (see
        overwritable_shortcut)."""
        identity = shortcut(self.downsample, x)
        out = conv_bn_act_modules(self.conv1, self.bn1, x)
        out = conv_bn_act_modules(self.conv2, self.bn2, out)
        if self.se is None:
            return conv_bn_act_modules(self.conv3, self.bn3, out, residual=identity, activation="relu",
                                       overwrite_residual=overwritable_shortcut(self.downsample, consume_input))
        out = conv_bn_act_modules(self.conv3, self.bn3, out, activation="none")
        if is_frozen(self.bn3) and frozen_cpu.se_excite_into(self.se, out, identity, "relu"):
            return out  # the gate applied in place: out is this block's own intermediate
        return self.se(out, residual=identity, activation="relu")


class ResNet(frozen_plan.ReplaysFrozenForward, nn.Module):
    """ResNet / ResNeXt: 7x7/2 Conv-BN-ReLU stem (fused), 3x3/2 max-pool, four stages of
    blocks (64, 128, 256, 512 planes; stride 1, 2, 2, 2), global average pool, fc.

    x [N, 3, H, W] -> logits [N, num_classes]. Same constructor, attributes, state_dict
    and initialisation as torchvision.models.resnet.ResNet (kaiming-normal fan_out
    convolutions, BN gamma 1 / beta 0, the last BN of each block zeroed with
    zero_init_residual); norm_layer must build nn.BatchNorm2d modules. `block_args`
    (timm's name) is passed to every block, e.g. {"se": True} for SE-ResNet.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, block_args: dict | None = None) -> None:
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self._block_args = dict(block_args or {})
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _batch_norm(self._norm_layer, self.inplanes)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        initialize(self, conv=kaiming_fan_out, norms=(nn.BatchNorm2d, nn.GroupNorm))
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       _batch_norm(norm_layer, planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer, **self._block_args)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, **self._block_args))
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] -> maxpool(relu(bn1(conv1(x)))) [N, 64, H/4, W/4], the conv fused;
        frozen (cnnkernels.nn.freeze), the max-pool without indices (frozen_cpu.max_pool)."""
        x = conv_bn_act_modules(self.conv1, self.bn1, x)
        pooled = frozen_cpu.max_pool(self.maxpool, x) if is_frozen(self.bn1) else None
        return self.maxpool(x) if pooled is None else pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] -> the last stage's feature map [N, 512 * expansion, H/32, W/32]."""
        x = self.forward_stem(x)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        blocks = [block for stage in stages for block in stage]
        if _hooked((self.maxpool, *stages, *blocks)) or not all(isinstance(b, (BasicBlock, Bottleneck))
                                                              for b in blocks):
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        for block in blocks:  # each block's input is this call's own intermediate, read by no one after
            x = block(x, consume_input=True)
        return x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return frozen_linear(self.fc, torch.flatten(x, 1))


def build_resnet(block: type[BasicBlock | Bottleneck], layers: list[int], weights=None, **kwargs) -> ResNet:
    """ResNet(block, layers, **kwargs), then load_weights(model, weights) when a checkpoint
    (a file path or a state_dict: nothing is downloaded) is given."""
    return with_weights(ResNet(block, layers, **kwargs), weights)


@register_model
def resnet18(*, weights=None, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]), 11.7M parameters with 1000 classes. kwargs go to ResNet
    (num_classes, zero_init_residual, norm_layer, ...); weights: a checkpoint path or state_dict."""
    return build_resnet(BasicBlock, [2, 2, 2, 2], weights, **kwargs)


@register_model
def resnet34(*, weights=None, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]), 21.8M parameters. Arguments as resnet18."""
    return build_resnet(BasicBlock, [3, 4, 6, 3], weights, **kwargs)


@register_model
def resnet50(*, weights=None, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]), 25.6M parameters. Arguments as resnet18."""
    return build_resnet(Bottleneck, [3, 4, 6, 3], weights, **kwargs)


@register_model
def resnet101(*, weights=None, **kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]), 44.5M parameters. Arguments as resnet18."""
    return build_resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)


@register_model
def resnet152(*, weights=None, **kwargs) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]), 60.2M parameters. Arguments as resnet18."""
    return build_resnet(Bottleneck, [3, 8, 36, 3], weights, **kwargs)


@register_model(aliases=("resnext50",))
def resnext50_32x4d(*, weights=None, **kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Bottleneck, [3, 4, 6, 3], groups 32, width_per_group 4), 25.0M
    parameters. Arguments as resnet18."""
    return build_resnet(Bottleneck, [3, 4, 6, 3], weights, **_with_groups(kwargs, 32, 4))


@register_model
def resnext101_32x8d(*, weights=None, **kwargs) -> ResNet:
    """ResNeXt-101 32x8d (Bottleneck, [3, 4, 23, 3], groups 32, width_per_group 8), 88.8M
    parameters. Arguments as resnet18."""
    return build_resnet(Bottleneck, [3, 4, 23, 3], weights, **_with_groups(kwargs, 32, 8))


@register_model
def resnext101_64x4d(*, weights=None, **kwargs) -> ResNet:
    """ResNeXt-101 64x4d (Bottleneck, [3, 4, 23, 3], groups 64, width_per_group 4), 83.5M
    parameters. Arguments as resnet18."""
    return build_resnet(Bottleneck, [3, 4, 23, 3], weights, **_with_groups(kwargs, 64, 4))


def _with_groups(kwargs: dict, groups: int, width_per_group: int) -> dict:
    for key, value in (("groups", groups), ("width_per_group", width_per_group)):
        if kwargs.get(key, value) != value:
            raise ValueError(f"this model fixes {key}={value}, got {kwargs[key]}")
    return {**kwargs, "groups": groups, "width_per_group": width_per_group}
