"""cnnkernels.nn.convert rules of the ResNet family, registered when cnnkernels.models is
imported (cnnkernels imports it): torchvision's ResNet, BasicBlock and Bottleneck, and
timm's ResNet blocks (plain, or Bottleneck with its SEModule), become the fused modules of
models/resnet.py, sharing their submodules.

  torchvision_resnet        torchvision ResNet -> ResNet (fused stem)
  torchvision_resnet_block  torchvision BasicBlock / Bottleneck -> the fused blocks
  timm_resnet_block         timm BasicBlock / Bottleneck (plain, or Bottleneck with SEModule)
                            -> the fused blocks (SE through cnnkernels.nn.SqueezeExcite)
"""
from __future__ import annotations

from torch import nn

from cnnkernels.nn.convert import (FusedSequential, Rule, adopt, children_of, has_exactly, is_conv_bn_pair,
                                   is_identity, is_instance_of, is_plain_downsample, is_relu, register_rule)
from cnnkernels.nn.squeeze_excite import SqueezeExcite

from .resnet import BasicBlock, Bottleneck, ResNet

TV_RESNET = "torchvision.models.resnet"
TIMM_RESNET = "timm.models.resnet"


# --- torchvision ResNet -----------------------------------------------------------------

def _match_tv_resnet(module) -> bool:
    return (is_instance_of(module, TV_RESNET, "ResNet") and is_conv_bn_pair(module.conv1, module.bn1)
            and is_relu(module.relu) and type(module.maxpool) is nn.MaxPool2d
            and has_exactly(module, {"conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                                     "avgpool", "fc"}))


def _replace_tv_resnet(module):
    children = {k: v for k, v in children_of(module).items() if k != "relu"}
    attributes = {k: getattr(module, k) for k in ("inplanes", "dilation", "groups", "base_width", "_norm_layer")}
    return adopt(ResNet, module, children, {**attributes, "_block_args": {}})


def _match_tv_block(module) -> bool:
    if is_instance_of(module, TV_RESNET, "BasicBlock"):
        units = (("conv1", "bn1"), ("conv2", "bn2"))
    elif is_instance_of(module, TV_RESNET, "Bottleneck"):
        units = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    else:
        return False
    names = {n for unit in units for n in unit} | {"relu"}
    if module.downsample is not None:
        names.add("downsample")
    return (has_exactly(module, names) and is_relu(module.relu) and is_plain_downsample(module.downsample)
            and all(is_conv_bn_pair(getattr(module, c), getattr(module, b)) for c, b in units))


def _replace_block(module, se: SqueezeExcite | None = None):
    bottleneck = hasattr(module, "conv3")
    names = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if bottleneck else ())
    children = {n: getattr(module, n) for n in names}
    if bottleneck:
        children["se"] = se
    downsample = module.downsample
    if downsample is not None and not is_plain_downsample(downsample):  # timm's avg-down: fuse its conv-BN
        downsample = FusedSequential.from_sequential(downsample)
    children["downsample"] = downsample
    stride = module.conv2.stride[0] if bottleneck else module.conv1.stride[0]
    return adopt(Bottleneck if bottleneck else BasicBlock, module, children, {"stride": stride})


# --- timm ResNet blocks -------------------------------------------------------------------

TIMM_RESNET = "timm.models.resnet"


def _timm_se(module) -> bool:
    """timm's SEModule in its plain form: mean squeeze, fc1, ReLU, fc2, sigmoid gate."""
    return (type(module).__name__ == "SEModule" and type(module).__module__.startswith("timm.")
            and not getattr(module, "add_maxpool", True) and type(module.bn) is nn.Identity
            and is_relu(module.act) and _is_sigmoid(module.gate)
            and type(module.fc1) is nn.Conv2d and type(module.fc2) is nn.Conv2d)


def _is_sigmoid(module) -> bool:
    """nn.Sigmoid or timm's own Sigmoid layer (same function)."""
    cls = type(module)
    return cls is nn.Sigmoid or (cls.__name__ == "Sigmoid" and cls.__module__ == "timm.layers.activations")


def _is_timm_downsample(module) -> bool:
    """None, Sequential(Conv2d, BatchNorm2d), or timm's avg-down Sequential(AvgPool2d or
    Identity, Conv2d, BatchNorm2d)."""
    if is_plain_downsample(module):
        return True
    return (type(module) is nn.Sequential and len(module) == 3 and type(module[0]) in (nn.AvgPool2d, nn.Identity)
            and is_conv_bn_pair(module[1], module[2]))


def _match_timm_block(module) -> bool:
    if is_instance_of(module, TIMM_RESNET, "BasicBlock"):
        units, acts = (("conv1", "bn1"), ("conv2", "bn2")), ("act1", "act2")
        if module.se is not None:  # the fused BasicBlock has no SE gate
            return False
    elif is_instance_of(module, TIMM_RESNET, "Bottleneck"):
        units, acts = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), ("act1", "act2", "act3")
        if module.se is not None and not _timm_se(module.se):
            return False
    else:
        return False
    allowed = {n for unit in units for n in unit} | set(acts) | {"drop_block", "aa", "se", "downsample", "drop_path"}
    return (set(children_of(module)) <= allowed and is_identity(module.drop_block) and is_identity(module.aa)
            and is_identity(module.drop_path) and all(is_relu(getattr(module, a)) for a in acts)
            and _is_timm_downsample(module.downsample)
            and all(is_conv_bn_pair(getattr(module, c), getattr(module, b)) for c, b in units))


def _replace_timm_block(module):
    se = getattr(module, "se", None)
    return _replace_block(module, SqueezeExcite.from_modules(se.fc1, se.fc2) if se is not None else None)


for _rule in (
    Rule("torchvision_resnet", _match_tv_resnet, _replace_tv_resnet),
    Rule("torchvision_resnet_block", _match_tv_block, _replace_block),
    Rule("timm_resnet_block", _match_timm_block, _replace_timm_block),
):
    register_rule(_rule)
