"""Training-step plumbing of the conv ops, on every backend: a weight's gradient comes in
the weight's own layout (as torch's conv2d gives it, so autograd keeps it and the
optimizer walks matching strides), and the outputs kept only for backward (conv_out,
the saved statistics) cost no zero-filled gradient tensors. GPU backends are marked gpu."""
from __future__ import annotations

import pytest
import torch

import cnnkernels
from cnnkernels import ops
from helpers import skip_or_fail

BACKENDS = [pytest.param("reference"), pytest.param("cpu"), pytest.param("triton"),
            pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton-gpu", marks=pytest.mark.gpu)]
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _device(backend):
    if backend == "cpu" and not cnnkernels._library.extension_loaded():
        skip_or_fail("cnnkernels._C is not built")
    return ("cuda", "triton") if backend in ("cuda", "triton-gpu") else ("cpu", backend)


def _call(op, x, weight, bn):
    per_channel = bn.shape[0]
    kwargs = dict(padding=1, training=True)
    running = torch.zeros(per_channel, device=x.device), torch.ones(per_channel, device=x.device)
    return getattr(ops, op)(x, weight, None, bn, bn.detach().clone().requires_grad_(), *running, **kwargs)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("op", ["conv_bn_act", "bn_act_conv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_keeps_the_weights_layout(backend, op, layout):
    device, backend = _device(backend)
    fmt = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(16, 8, 3, 3, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_()
    bn = torch.rand(16 if op == "conv_bn_act" else 8, generator=gen).add(0.5).to(device).requires_grad_()
    with cnnkernels.use_backend(backend):
        out = _call(op, x, weight, bn)
        out.backward(torch.randn(out.shape, generator=gen).to(device))
    assert weight.grad.stride() == weight.stride(), (weight.grad.stride(), weight.stride())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_outputs_get_no_zero_filled_gradients(backend):
    device, backend = _device(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(device).requires_grad_()
    weight = torch.randn(16, 8, 3, 3, generator=gen).to(device).requires_grad_()
    bn = torch.ones(16, device=device, requires_grad=True)
    with cnnkernels.use_backend(backend):
        out = _call("conv_bn_act", x, weight, bn)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            out.sum().backward()
    fills = [e for e in prof.events() if e.name in ("aten::zero_", "aten::fill_")
             and e.input_shapes and list(e.input_shapes[0]) == list(out.shape)]
    assert not fills, f"{len(fills)} zero-filled tensors of the output's shape in backward"
    assert weight.grad is not None and x.grad is not None
