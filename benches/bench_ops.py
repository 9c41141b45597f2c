"""Every cnnkernels op against the unfused torch sequence it replaces, on real layer
shapes of ResNet-50, ResNeXt-50 32x4d, SE-ResNeXt-50 and DenseNet-121 (cnnkernels/bench/layers.py),
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

import pytest
import torch
import torch._inductor.config as inductor_config

from cnnkernels import ops
from cnnkernels.bench.layers import LAYERS, explain_fused, layer_traffic, run_fused
from cnnkernels.bench.layers import build as build_layer
from cnnkernels.nn import freeze

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OURS = ("cpu",) if DEVICE == "cpu" else ("cuda", "triton")
VARIANTS = ("torch_eager", "torch_compile") + tuple(f"cnnkernels_{b}" for b in OURS) + (
    ("cnnkernels_cpu_frozen",) if DEVICE == "cpu" else ())
MODES = ("eval", "train")


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
    return lambda *inputs: run_fused(module, *inputs, backend=backend)


def explain(module, backend, inputs) -> str | None:
    """The kernel our op would run on backend; skips the test when the backend refuses."""
    verdict = explain_fused(module, *inputs, backend=backend)
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
    module, inputs = build_layer(layer, mode, batch, dtype, DEVICE)
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
