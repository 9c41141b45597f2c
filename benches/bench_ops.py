"""conv_bn_act against the unfused torch sequence (torch eager and torch.compile) on
real ResNet-50 layer shapes. Each pytest-benchmark group is one layer and mode, and
holds the baselines and ours, so the comparison is made in one run.

    pytest benches/bench_ops.py --benchmark-only --benchmark-group-by=group

CPU defaults: batch 8 (BENCH_BATCH), float32, channels_last, 2 warm-up rounds, median
of at least 5 rounds. The Triton backend is left out on CPU (its interpreter is a
correctness tool, not a fast path).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = int(os.environ.get("BENCH_BATCH", "8"))
# (name, C_in, C_out, H, kernel, stride): ResNet-50 conv layers.
LAYERS = [
    ("layer1.conv2_3x3", 64, 64, 56, 3, 1),
    ("layer2.conv1_1x1", 256, 128, 56, 1, 1),
    ("layer3.conv2_3x3", 256, 256, 14, 3, 1),
]
OURS = ["cpu", "reference"] if DEVICE == "cpu" else ["cuda", "triton"]


def make_layer(c_in, c_out, h, kernel, stride, training):
    torch.manual_seed(0)
    x = torch.randn(BATCH, c_in, h, h, device=DEVICE).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False).to(DEVICE)
    bn = torch.nn.BatchNorm2d(c_out).to(DEVICE)
    conv, bn = conv.to(memory_format=torch.channels_last), bn
    bn.train(training)
    return x, conv, bn


def torch_sequence(x, conv, bn, residual):
    return F.relu(bn(conv(x)) + residual)


def ours(x, conv, bn, residual):
    return ops.conv_bn_act(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           stride=conv.stride, padding=conv.padding, training=bn.training,
                           residual=residual)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_step(fn, x, conv, bn, residual, training):
    def step():
        if training:
            out = fn(x, conv, bn, residual)
            out.sum().backward()
        else:
            with torch.no_grad():
                fn(x, conv, bn, residual)
        sync()
    return step


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train_fwd_bwd"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
@pytest.mark.parametrize("variant", ["torch_eager", "torch_compile"] + [f"cnnkernels_{b}" for b in OURS])
def test_conv_bn_relu_residual(benchmark, variant, layer, training):
    name, c_in, c_out, h, kernel, stride = layer
    x, conv, bn = make_layer(c_in, c_out, h, kernel, stride, training)
    residual = torch.randn(BATCH, c_out, h // stride, h // stride, device=DEVICE).contiguous(
        memory_format=torch.channels_last)
    if training:
        x.requires_grad_(True)
    benchmark.group = f"{name} {'train fwd+bwd' if training else 'eval'} batch {BATCH} {DEVICE}"
    if variant == "torch_eager":
        fn = torch_sequence
    elif variant == "torch_compile":
        torch._dynamo.reset()
        fn = torch.compile(torch_sequence)
    else:
        backend = variant.removeprefix("cnnkernels_")
        verdict = ops.explain("conv_bn_act", x, conv.weight, None, bn.weight, bn.bias, bn.running_mean,
                              bn.running_var, stride=conv.stride, padding=conv.padding, training=training,
                              residual=residual)
        if backend in verdict["rejected"]:
            pytest.skip(f"{backend}: {'; '.join(verdict['rejected'][backend])}")
        context = cnnkernels.use_backend(backend)
        context.__enter__()
        fn = ours
    try:
        step = run_step(fn, x, conv, bn, residual, training)
        for _ in range(2):  # warm-up (compiles torch.compile's graph)
            step()
        benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
    finally:
        if variant.startswith("cnnkernels_"):
            context.__exit__(None, None, None)
