"""Every cnnkernels op against the unfused torch sequence it replaces, on real layer
shapes of ResNet-50, ResNeXt-50 32x4d, SE-ResNeXt-50 and DenseNet-121 (LAYERS below),
forward ("eval") and training forward + backward ("train").

    pytest benches/bench_ops.py --benchmark-only

One pytest-benchmark group per layer and mode holds every variant:
  torch_eager       the unfused sequence as torch modules (oneDNN on CPU, cuDNN with
                    cudnn.benchmark on GPU)
  torch_compile     torch.compile of that sequence; eval compiles with freezing
                    (BN folded, oneDNN prepacked weights and fused post-ops on CPU)
  cnnkernels_<b>    our op forced onto backend b: cpu on CPU; cuda and triton on GPU
  cnnkernels_cpu_frozen  conv_bn_act in eval on CPU with the module frozen
                    (cnnkernels.nn.freeze: BN folded into the weights once, the
                    counterpart of torch_compile's freezing)
Every variant's output is checked against torch_eager's before it is timed, and its
first call (compilation included) is timed apart from the steady state. Training runs
torch.autograd.grad of the output with a dense random grad_out, for every activation
input (not the stem's image) and every parameter; no gradient accumulates across rounds.
Each benchmark's extra_info holds the layer, the first-call time, the kernel our op
picked (cnnkernels.ops.explain) and the memory traffic the fusion saves
(cnnkernels/bench/traffic.py); benches/conftest.py prints those in a table at the end.
Batch, dtype and which modes are compiled: see benches/conftest.py.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

import cnnkernels
from cnnkernels import ops
from cnnkernels.bench import traffic
from cnnkernels.nn import freeze
from cnnkernels.nn.freeze import folded_eval_arguments

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OURS = ("cpu",) if DEVICE == "cpu" else ("cuda", "triton")
VARIANTS = ("torch_eager", "torch_compile") + tuple(f"cnnkernels_{b}" for b in OURS) + (
    ("cnnkernels_cpu_frozen",) if DEVICE == "cpu" else ())
MODES = ("eval", "train")


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


def build(layer: Layer, mode: str, batch: int, dtype: torch.dtype):
    """The module (seeded, random BN statistics) and its inputs, channels_last."""
    torch.manual_seed(0)
    module = MODULES[layer.op](layer)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    module = module.to(DEVICE, dtype, memory_format=torch.channels_last).train(mode == "train")

    def activation(channels, size):
        return torch.randn(batch, channels, size, size, device=DEVICE, dtype=dtype).contiguous(
            memory_format=torch.channels_last)

    x = activation(layer.channels, layer.size)
    x.requires_grad_(mode == "train" and layer.input_grad)
    inputs = [x]
    if layer.op == "add_act" or layer.residual:
        out_size = (layer.size + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
        residual = activation(layer.channels if layer.op != "conv_bn_act" else layer.out_channels, out_size)
        inputs.append(residual.requires_grad_(mode == "train"))
    return module, tuple(inputs)


@pytest.fixture(autouse=True, scope="module")
def _cudnn_benchmark():
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = DEVICE == "cuda"
    yield
    torch.backends.cudnn.benchmark = previous


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_step(fn, inputs, mode, grad_targets):
    """One call of the variant: forward under no_grad (eval), or forward + autograd.grad
    of every target with a fixed dense grad_out (train)."""
    if mode == "eval":
        def step():
            with torch.no_grad():
                out = fn(*inputs)
            sync()
            return out
        return step
    grad_out = []

    def step():
        out = fn(*inputs)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        torch.autograd.grad(out, grad_targets, grad_out[0])
        sync()
        return out
    return step


def fused_fn(module, backend):
    op = getattr(ops, module.op)

    def run(*inputs):
        args, kwargs = module.fused_call(*inputs)
        with cnnkernels.use_backend(backend):
            return op(*args, **kwargs)
    return run


def explain(module, backend, inputs) -> str | None:
    """The kernel our op would run on backend; skips the test when the backend refuses."""
    args, kwargs = module.fused_call(*inputs)
    with cnnkernels.use_backend(backend):
        verdict = ops.explain(module.op, *args, **kwargs)
    if backend in verdict["rejected"]:
        pytest.skip(f"backend {backend} cannot run this input: {'; '.join(verdict['rejected'][backend])}")
    return verdict["kernel"]


def relative_error(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", LAYERS, ids=[layer.id for layer in LAYERS])
def test_op(benchmark, bench_ops_settings, layer, mode, variant):
    settings = bench_ops_settings
    if not hasattr(ops, layer.op):
        pytest.skip(f"cnnkernels.ops.{layer.op} does not exist yet (issue 3: being written); "
                    f"these {layer.source.split(' ')[0]} cases run once it does")
    if variant == "torch_compile" and mode not in settings.compile_modes:
        pytest.skip(f"torch.compile of {mode} is off (--bench-ops-compile={settings.compile})")
    batch, dtype = settings.batch, settings.dtype
    module, inputs = build(layer, mode, batch, dtype)
    grad_targets = [t for t in inputs if t.requires_grad] + [p for p in module.parameters()]
    with torch.no_grad():
        reference_out = module(*inputs)

    kernel = None
    if variant == "torch_eager":
        fn = module
    elif variant == "torch_compile":
        torch._dynamo.reset()
        fn = torch.compile(module)
    else:
        backend = variant.removeprefix("cnnkernels_").removesuffix("_frozen")
        if variant.endswith("_frozen"):
            if layer.op != "conv_bn_act" or mode != "eval":
                pytest.skip(f"{variant} measures conv_bn_act in eval only: freezing folds BatchNorm into the "
                            f"conv weights, which {layer.op} in {mode} mode does not have or cannot use")
            freeze(module)
        kernel = explain(module, backend, inputs)
        fn = fused_fn(module, backend)

    step = make_step(fn, inputs, mode, grad_targets)
    start = time.perf_counter()
    freezing = variant == "torch_compile" and mode == "eval"
    with inductor_config.patch(freezing=freezing):
        out = step()  # compiles torch.compile's graph (frozen in eval)
    first_call = time.perf_counter() - start
    error = relative_error(out, reference_out)
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    assert error < tolerance, f"{variant} differs from torch_eager: relative error {error:.2e}"

    t = layer_traffic(layer, batch, mode, torch.empty((), dtype=dtype).element_size())
    benchmark.group = f"{layer.op} {layer.source} | {mode} | N={batch} {str(dtype).removeprefix('torch.')} {DEVICE}"
    benchmark.extra_info.update(
        op=layer.op, source=layer.source, mode=mode, variant=variant, batch=batch,
        dtype=str(dtype).removeprefix("torch."), memory_format="channels_last", device=DEVICE,
        threads=torch.get_num_threads(),
        first_call_s=round(first_call, 4), kernel=kernel, relative_error_vs_eager=error, **t.extra_info())
    benchmark(step)
    benchmark.extra_info["loadavg_1m_after"] = os.getloadavg()[0]  # other processes on this machine
