"""On a CUDA device: every cnnkernels op on the cuda and triton backends against the unfused
torch sequence it replaces (cuDNN convolutions, torch BatchNorm / activations) run in
float64 on the same GPU, on the real layer shapes of ResNet-50, ResNeXt-50, SE-ResNeXt-50
and DenseNet-121 (cnnkernels/bench/layers.py), batch 8: output, the gradient of every
input and parameter, and the running statistics, in train and eval, float32 / bfloat16 /
float16, channels_last and NCHW.

Bounds by relative norm against float64 (helpers.half_precision_bound): float32 (TF32 off)
1e-4; half precision max(1e-2, twice the error of torch's own unfused sequence in that
dtype on the same inputs), so the bound follows what cuDNN itself reaches. Skipped where
no GPU is present.
"""
from __future__ import annotations

import copy

import pytest
import torch

from cnnkernels.bench.layers import LAYERS, build, explain_fused, run_fused
from helpers import half_precision_bound, rel_err

pytestmark = pytest.mark.gpu

BATCH = 8  # enough values per channel at 7x7 that a ReLU-mask flip or two moves no gradient far
DEVICE = "cuda"
# (dtype, memory format): float16 on channels_last only, the layout mixed-precision runs use
FORMATS = [(torch.float32, torch.channels_last), (torch.float32, torch.contiguous_format),
           (torch.bfloat16, torch.channels_last), (torch.bfloat16, torch.contiguous_format),
           (torch.float16, torch.channels_last)]
FORMAT_IDS = ["fp32-cl", "fp32-nchw", "bf16-cl", "bf16-nchw", "fp16-cl"]


def _run(module, inputs, grad_out, fused_backend=None):
    """Output, gradients of (inputs requiring grad + parameters), running statistics after
    one call of module's unfused forward, or of its fused op on fused_backend."""
    if fused_backend is None:
        out = module(*inputs)
    else:
        out = run_fused(module, *inputs, backend=fused_backend)
    leaves = [t for t in inputs if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads, [b.clone() for b in module.buffers() if b.is_floating_point()]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype, memory_format", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer.id for layer in LAYERS])
def test_op_matches_unfused_torch(layer, backend, dtype, memory_format, mode):
    module, inputs = build(layer, mode, BATCH, dtype, DEVICE, memory_format)
    inputs = [t.detach().requires_grad_(layer.input_grad or i > 0) for i, t in enumerate(inputs)]
    verdict = explain_fused(module, *inputs, backend=backend)
    if backend in verdict["rejected"]:
        pytest.skip(f"{backend} declines this input: {'; '.join(verdict['rejected'][backend])}")

    reference = copy.deepcopy(module).double()
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    with torch.no_grad():
        shape = copy.deepcopy(reference)(*ref_inputs).shape  # a copy: train mode updates running stats
    grad_out = torch.randn(shape, device=DEVICE, dtype=torch.float64, generator=torch.Generator(DEVICE).manual_seed(1))
    ref_out, ref_grads, ref_stats = _run(copy.deepcopy(reference), ref_inputs, grad_out)
    torch_out, torch_grads, torch_stats = _run(copy.deepcopy(module), inputs, grad_out)
    out, grads, stats = _run(copy.deepcopy(module), inputs, grad_out, fused_backend=backend)

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert torch.isfinite(out).all()
    checks = [("out", out, torch_out, ref_out)]
    checks += [(f"grad{i}", g, tg, rg) for i, (g, tg, rg) in enumerate(zip(grads, torch_grads, ref_grads))]
    checks += [(f"buffer{i}", s, ts, rs) for i, (s, ts, rs) in enumerate(zip(stats, torch_stats, ref_stats))]
    failures = []
    for name, ours, theirs, ref in checks:
        bound = half_precision_bound(rel_err(theirs, ref), dtype)
        err = rel_err(ours, ref)
        if not err < bound:
            failures.append(f"{name}: {err:.2e} (bound {bound:.2e}, torch {rel_err(theirs, ref):.2e})")
    assert not failures, f"{verdict['kernel']}: " + "; ".join(failures)
