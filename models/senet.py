"""SE-ResNet and SE-ResNeXt (Hu et al. 2018), with timm's seresnet / seresnext layout.

These are models/resnet.py's ResNet with the Bottleneck's `se` switch on: a
Squeeze-and-Excitation gate (cnnkernels.nn.SqueezeExcite, reduction 16, bottleneck
width make_divisible(C / 16, 8)) scales each block's bn3 output before the residual
add and the final ReLU. The state_dict keys are timm's (seresnet50, seresnext50_32x4d,
...): conv1, bn1, layerL.B.{conv1,bn1,conv2,bn2,conv3,bn3}, layerL.B.se.fc1/fc2
(weight, bias), layerL.0.downsample.0/1, fc; a timm checkpoint loads with strict=True.
The network is initialised as torchvision's ResNet (zero_init_residual=False by
default; timm zeroes bn3's gamma, pass zero_init_residual=True for that).
"""
from __future__ import annotations

from ._registry import register_model
from .resnet import Bottleneck, ResNet, _with_groups, build_resnet

__all__ = ["se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d", "se_resnext101_32x4d"]


def _se(kwargs: dict) -> dict:
    block_args = {**(kwargs.pop("block_args", None) or {}), "se": True}
    return {**kwargs, "block_args": block_args}


@register_model
def se_resnet50(*, weights=None, **kwargs) -> ResNet:
    """SE-ResNet-50 (timm seresnet50): Bottleneck [3, 4, 6, 3] with SE, 28.1M parameters.
    kwargs go to ResNet (num_classes, zero_init_residual, block_args={"se_reduction": 16}, ...);
    weights: a checkpoint path or state_dict."""
    return build_resnet(Bottleneck, [3, 4, 6, 3], weights, **_se(kwargs))


@register_model
def se_resnet101(*, weights=None, **kwargs) -> ResNet:
    """SE-ResNet-101 (timm seresnet101): Bottleneck [3, 4, 23, 3] with SE, 49.3M parameters."""
    return build_resnet(Bottleneck, [3, 4, 23, 3], weights, **_se(kwargs))


@register_model
def se_resnet152(*, weights=None, **kwargs) -> ResNet:
    """SE-ResNet-152 (timm seresnet152): Bottleneck [3, 8, 36, 3] with SE, 66.8M parameters."""
    return build_resnet(Bottleneck, [3, 8, 36, 3], weights, **_se(kwargs))


@register_model(aliases=("se_resnext50",))
def se_resnext50_32x4d(*, weights=None, **kwargs) -> ResNet:
    """SE-ResNeXt-50 32x4d (timm seresnext50_32x4d): Bottleneck [3, 4, 6, 3], groups 32,
    width_per_group 4, with SE, 27.6M parameters."""
    return build_resnet(Bottleneck, [3, 4, 6, 3], weights, **_se(_with_groups(kwargs, 32, 4)))


@register_model
def se_resnext101_32x4d(*, weights=None, **kwargs) -> ResNet:
    """SE-ResNeXt-101 32x4d (timm seresnext101_32x4d): Bottleneck [3, 4, 23, 3], groups 32,
    width_per_group 4, with SE, 49.0M parameters."""
    return build_resnet(Bottleneck, [3, 4, 23, 3], weights, **_se(_with_groups(kwargs, 32, 4)))
