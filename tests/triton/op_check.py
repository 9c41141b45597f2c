"""conv_bn_act through the public op with the Triton backend forced (Triton's interpreter
on CPU tensors) against the float64 reference: output, running statistics and every
gradient, train or eval. Shared by the tests of the specialised forward kernels.

Every buffer cnnkernels.triton.conv_bn_act allocates (out, conv_out, partial statistics,
gradients) is NaN-filled first, so an element a kernel forgets to write shows up; each
forward kernel is wrapped in a counter, so the test also sees which one ran."""
from __future__ import annotations

import zlib

import torch

import cnnkernels
from cnnkernels import ops, reference
from cnnkernels.triton import _implicit_gemm, conv1x1_bn_act, grouped_conv_bn_act
from cnnkernels.triton import conv_bn_act as triton_conv_bn_act
from helpers import TOLERANCE, ConvCase, rel_err
from test_conv_bn_act_triton import _PoisonedTorch

EPS = 1e-5  # the public op's default
GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias", "residual")
FORWARD_KERNELS = {
    "general": (_implicit_gemm, "_conv_fwd_kernel"),
    "conv1x1": (conv1x1_bn_act, "_conv1x1_fwd_kernel"),
    "grouped": (grouped_conv_bn_act, "_grouped_conv_fwd_kernel"),
}


class _CountingKernel:
    def __init__(self, dual, name, counts):
        self.dual, self.name, self.counts = dual, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.dual[grid]


def _run(backend, case, inputs, training, grad_out):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = inputs
    running_mean, running_var = running_mean.clone(), running_var.clone()
    with cnnkernels.use_backend(backend):
        out = ops.conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              training=training, momentum=0.1, residual=residual, **case.kwargs())
        leaves = [t for t in (x, weight, bias, bn_weight, bn_bias, residual) if t is not None]
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, (x, weight, bias, bn_weight, bn_bias, residual)) if t is not None]
    return out, running_mean, running_var, dict(zip(names, grads))


def _as_double(inputs, channels_last):
    doubled = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    if channels_last:
        doubled[0] = doubled[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return doubled


def _reference_grads(case, inputs64, out, grad_out, training) -> dict:
    """The float64 reference's gradients, with `out` (the tested backend's output) deciding
    the relu mask: in bfloat16 a few outputs within rounding of 0 land on the other side,
    and their gradients are then legitimately 0 or not."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = (
        None if t is None else t.detach() for t in inputs64)
    conv = ([case.stride] * 2, [case.padding] * 2, [case.dilation] * 2, case.groups)
    _, conv_out, mean, var = reference.conv_bn_act_forward(x, weight, bias, bn_weight, bn_bias, running_mean,
                                                           running_var, *conv, training, EPS, residual,
                                                           case.activation)
    leaves = (x, weight, bias, bn_weight, bn_bias, residual)
    grads = reference.conv_bn_act_backward(grad_out.to(out.dtype).double(), out.detach().double(), x, weight, bias,
                                           conv_out, bn_weight, mean, var, *conv, training, EPS, case.activation,
                                           [t is not None for t in leaves])
    return {name: grad for name, grad, t in zip(GRAD_NAMES, grads, leaves) if t is not None}


def check_triton_against_reference(monkeypatch, case: ConvCase, dtype: torch.dtype, training: bool,
                                   expect_kernel: str) -> None:
    """Runs `case` forward and backward through cnnkernels.ops.conv_bn_act on the Triton
    backend and asserts: only the forward kernel `expect_kernel` ran; out (dtype, memory
    format, no NaN) and the updated running statistics match the public op on the
    float64 reference backend, and all six gradients the float64 reference's
    (_reference_grads), within TOLERANCE."""
    counts: dict = {}
    monkeypatch.setattr(triton_conv_bn_act, "torch", _PoisonedTorch())
    for name, (module, attribute) in FORWARD_KERNELS.items():
        monkeypatch.setattr(module, attribute, _CountingKernel(getattr(module, attribute), name, counts))

    seed = zlib.crc32(f"{case.name}{training}{dtype}".encode())
    inputs = case.make(dtype, seed=seed)
    inputs64 = _as_double(inputs, case.channels_last)
    out_shape = reference.conv_output_size(inputs[0].shape, inputs[1].shape, [case.stride] * 2, [case.padding] * 2,
                                           [case.dilation] * 2)
    grad_out = torch.randn(out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref_out, ref_rm, ref_rv, _ = _run("reference", case, inputs64, training, grad_out)
    out, rm, rv, grads = _run("triton", case, inputs, training, grad_out)
    assert set(counts) == {expect_kernel}, counts

    tol = TOLERANCE[dtype]
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.shape == ref_out.shape and out.is_contiguous(memory_format=fmt)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < tol
    assert rel_err(rm, ref_rm) < tol and rel_err(rv, ref_rv) < tol
    ref_grads = _reference_grads(case, inputs64, out, grad_out, training)
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        assert grad.shape == ref_grad.shape and grad.dtype == dtype and not grad.isnan().any(), name
        if name == "bias" and training:  # batch statistics cancel a conv bias: its gradient is ~0
            assert grad.double().norm() < tol * grad_out.norm(), name
        else:
            assert rel_err(grad, ref_grad) < tol, (name, rel_err(grad, ref_grad))
