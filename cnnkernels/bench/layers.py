"""Real layer shapes of ResNet-50, ResNeXt-50 32x4d, SE-ResNeXt-50 and DenseNet-121, one
per cnnkernels op and stage (LAYERS), with the unfused torch sequence each op replaces
(MODULES: forward() is the unfused sequence, fused_call() the op's arguments over the same
parameters), their memory traffic, and build(), which makes a seeded module and inputs.
Shared by benches/bench_ops.py (pytest-benchmark), benches/gpu_check_ops.py and the GPU
tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import cnnkernels
from cnnkernels import ops
from cnnkernels.bench import traffic
from cnnkernels.nn.freeze import folded_eval_arguments


@dataclass(frozen=True)
class Layer:
    """One op on one layer's shapes. channels/out_channels: the op's input and output
    channels (se_excite: out_channels is the SE hidden width; add_act: unused)."""
    op: str
    source: str
    channels: int
    out_channels: int
    size: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    residual: bool = False
    activation: str = "relu"
    input_grad: bool = True

    @property
    def id(self) -> str:
        return f"{self.op}-{self.source.split(' ')[0]}-{self.source.split(' ')[1]}"


# Layer names are torchvision's (resnet50, resnext50_32x4d, densenet121) and timm's
# (seresnext50_32x4d); ".1" is the second block of a stage, whose shapes every later
# block of that stage repeats.
LAYERS = [
    #      op             source layer                                                 C_in  C_out  H=W
    Layer("conv_bn_act", "resnet50 conv1 + bn1 + relu (7x7 stem, stride 2)",           3,    64,    224, kernel=7,
          stride=2, input_grad=False),
    Layer("conv_bn_act", "resnet50 layer1.1.conv1 + bn1 + relu (1x1 reduce)",          256,  64,    56),
    Layer("conv_bn_act", "resnet50 layer1.1.conv3 + bn3 + identity + relu (1x1 expand)", 64, 256,   56, residual=True),
    Layer("conv_bn_act", "resnet50 layer2.0.downsample (1x1 stride 2 + bn)",           256,  512,   56, stride=2,
          activation="none"),
    Layer("conv_bn_act", "resnet50 layer2.1.conv2 + bn2 + relu (3x3)",                 128,  128,   28, kernel=3),
    Layer("conv_bn_act", "resnet50 layer3.1.conv2 + bn2 + relu (3x3)",                 256,  256,   14, kernel=3),
    Layer("conv_bn_act", "resnet50 layer4.1.conv3 + bn3 + identity + relu (1x1 expand)", 512, 2048, 7, residual=True),
    Layer("conv_bn_act", "resnext50_32x4d layer1.1.conv2 + bn2 + relu (3x3, 32 groups of 4)", 128, 128, 56, kernel=3,
          groups=32),
    Layer("conv_bn_act", "resnext50_32x4d layer3.1.conv2 + bn2 + relu (3x3, 32 groups of 16)", 512, 512, 14, kernel=3,
          groups=32),
    Layer("conv_bn_act", "resnext50_32x4d layer4.1.conv2 + bn2 + relu (3x3, 32 groups of 32)", 1024, 1024, 7, kernel=3,
          groups=32),
    Layer("add_act",     "resnet50 layer1.1 out + identity, relu",                     256,  256,   56),
    Layer("add_act",     "resnet50 layer3.1 out + identity, relu",                     1024, 1024,  14),
    Layer("add_act",     "resnet50 layer4.1 out + identity, relu",                     2048, 2048,  7),
    Layer("se_excite",   "seresnext50_32x4d layer1.1.se + identity + relu (reduction 16)", 256, 16, 56, residual=True),
    Layer("se_excite",   "seresnext50_32x4d layer3.1.se + identity + relu (reduction 16)", 1024, 64, 14, residual=True),
    Layer("se_excite",   "seresnext50_32x4d layer4.1.se + identity + relu (reduction 16)", 2048, 128, 7, residual=True),
    Layer("bn_act_conv", "densenet121 denseblock1.denselayer1.norm1/relu1/conv1 (1x1)", 64,  128,   56),
    Layer("bn_act_conv", "densenet121 denseblock1.denselayer6.norm1/relu1/conv1 (1x1)", 224, 128,   56),
    Layer("bn_act_conv", "densenet121 denseblock1.denselayer1.norm2/relu2/conv2 (3x3)", 128, 32,    56, kernel=3),
    Layer("bn_act_conv", "densenet121 transition1.norm/relu/conv (1x1)",               256,  128,   56),
    Layer("bn_act_conv", "densenet121 denseblock3.denselayer24.norm1/relu1/conv1 (1x1)", 992, 128,  14),
]


# --- the unfused sequences, each with the fused op over the same parameters ---------

class ConvBNAct(nn.Module):
    """act(bn(conv(x)) + residual)."""
    op = "conv_bn_act"

    def __init__(self, layer: Layer):
        super().__init__()
        self.conv = nn.Conv2d(layer.channels, layer.out_channels, layer.kernel, layer.stride, layer.kernel // 2,
                              groups=layer.groups, bias=False)
        self.bn = nn.BatchNorm2d(layer.out_channels)
        self.activation = layer.activation

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.activation == "relu" else y

    def fused_call(self, x, residual=None):
        conv, bn = self.conv, self.bn
        folded = None if self.training else folded_eval_arguments(conv, bn, x)  # None unless frozen
        weight, bias, bn_weight, bn_bias, mean, var, eps = folded or (
            conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        return ((x, weight, bias, bn_weight, bn_bias, mean, var),
                dict(stride=conv.stride, padding=conv.padding, groups=conv.groups, training=self.training,
                     momentum=bn.momentum, eps=eps, residual=residual, activation=self.activation))


class AddAct(nn.Module):
    """act(x + residual), as a ResNet block ends."""
    op = "add_act"

    def __init__(self, layer: Layer):
        super().__init__()
        self.activation = layer.activation

    def forward(self, x, residual):
        y = x + residual
        return F.relu(y) if self.activation == "relu" else y

    def fused_call(self, x, residual):
        return (x, residual), dict(activation=self.activation)


class SqueezeExcite(nn.Module):
    """act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + residual): timm's SEModule and the
    residual add + activation of the block it ends."""
    op = "se_excite"

    def __init__(self, layer: Layer):
        super().__init__()
        self.fc1 = nn.Conv2d(layer.channels, layer.out_channels, 1)
        self.fc2 = nn.Conv2d(layer.out_channels, layer.channels, 1)
        self.activation = layer.activation

    def forward(self, x, residual=None):
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        y = x * gate
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.activation == "relu" else y

    def fused_call(self, x, residual=None):
        return ((x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias),
                dict(residual=residual, activation=self.activation))


class BNActConv(nn.Module):
    """conv(act(bn(x))): DenseNet's pre-activation order."""
    op = "bn_act_conv"

    def __init__(self, layer: Layer):
        super().__init__()
        self.bn = nn.BatchNorm2d(layer.channels)
        self.conv = nn.Conv2d(layer.channels, layer.out_channels, layer.kernel, layer.stride, layer.kernel // 2,
                              groups=layer.groups, bias=False)
        self.activation = layer.activation

    def forward(self, x):
        y = self.bn(x)
        return self.conv(F.relu(y) if self.activation == "relu" else y)

    def fused_call(self, x):
        conv, bn = self.conv, self.bn
        return ((x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var),
                dict(stride=conv.stride, padding=conv.padding, groups=conv.groups, training=self.training,
                     momentum=bn.momentum, eps=bn.eps, activation=self.activation))


MODULES = {cls.op: cls for cls in (ConvBNAct, AddAct, SqueezeExcite, BNActConv)}


def layer_traffic(layer: Layer, batch: int, mode: str, itemsize: int) -> traffic.Traffic:
    x_shape = (batch, layer.channels, layer.size, layer.size)
    weight_shape = (layer.out_channels, layer.channels // layer.groups, layer.kernel, layer.kernel)
    conv = dict(stride=layer.stride, padding=layer.kernel // 2)
    if layer.op == "conv_bn_act":
        return traffic.conv_bn_act(x_shape, weight_shape, **conv, residual=layer.residual,
                                   activation=layer.activation, mode=mode, input_grad=layer.input_grad,
                                   itemsize=itemsize)
    if layer.op == "add_act":
        return traffic.add_act(x_shape, activation=layer.activation, mode=mode, itemsize=itemsize)
    if layer.op == "se_excite":
        return traffic.se_excite(x_shape, layer.out_channels, residual=layer.residual,
                                 activation=layer.activation, mode=mode, itemsize=itemsize)
    return traffic.bn_act_conv(x_shape, weight_shape, **conv, activation=layer.activation, mode=mode,
                               itemsize=itemsize)


def build(layer: Layer, mode: str, batch: int, dtype: torch.dtype, device: str,
          memory_format: torch.memory_format = torch.channels_last):
    """The module (seeded, random BN statistics) and its inputs on `device`, in
    `memory_format` (channels_last unless told)."""
    torch.manual_seed(0)
    module = MODULES[layer.op](layer)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    module = module.to(device, dtype, memory_format=memory_format).train(mode == "train")

    def activation(channels, size):
        return torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(
            memory_format=memory_format)

    x = activation(layer.channels, layer.size)
    x.requires_grad_(mode == "train" and layer.input_grad)
    inputs = [x]
    if layer.op == "add_act" or layer.residual:
        out_size = (layer.size + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
        residual = activation(layer.channels if layer.op != "conv_bn_act" else layer.out_channels, out_size)
        inputs.append(residual.requires_grad_(mode == "train"))
    return module, tuple(inputs)


def run_fused(module: nn.Module, *inputs, backend: str | None = None):
    """The module's fused cnnkernels op over its parameters on inputs, on `backend` (None:
    the default choice, with no backend context entered, so torch.compile traces it)."""
    args, kwargs = module.fused_call(*inputs)
    op = getattr(ops, module.op)
    if backend is None:
        return op(*args, **kwargs)
    with cnnkernels.use_backend(backend):
        return op(*args, **kwargs)


def explain_fused(module: nn.Module, *inputs, backend: str | None = None) -> dict:
    """ops.explain of the module's fused op on inputs (forced onto `backend` when given)."""
    args, kwargs = module.fused_call(*inputs)
    with cnnkernels.use_backend(backend):
        return ops.explain(module.op, *args, **kwargs)
