"""Every backend of conv_bn_act against the float64 reference, forward and backward,
train and eval (running statistics included), on fresh random inputs."""
import zlib

import pytest
import torch

import cnnkernels
from cnnkernels import ops, reference
from helpers import CASES, TOLERANCE, rel_err, skip_or_fail

BACKENDS_ON_CPU = ["reference", "cpu", "triton"]
GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias", "residual")


def require_backend(backend, inputs, case, training):
    """Skips when the backend cannot run here, unless the build is required to provide it."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = inputs
    with cnnkernels.use_backend(backend):
        verdict = ops.explain("conv_bn_act", x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              training=training, residual=residual, **case.kwargs())
    if verdict["backend"] == backend:
        return
    reasons = "; ".join(verdict["rejected"].get(backend, []))
    message = f"{backend} cannot run here: {reasons}"
    skip_or_fail(message) if backend != "reference" else pytest.fail(message)


def run(backend, case, inputs, training, grad_out):
    """Forward + backward through the public op; returns out, running stats and grads."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = inputs
    running_mean, running_var = running_mean.clone(), running_var.clone()
    with cnnkernels.use_backend(backend):
        out = ops.conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              training=training, momentum=0.1, residual=residual, **case.kwargs())
        leaves = [t for t in (x, weight, bias, bn_weight, bn_bias, residual) if t is not None]
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, (x, weight, bias, bn_weight, bn_bias, residual)) if t is not None]
    return out, running_mean, running_var, dict(zip(names, grads))


def as_double(inputs):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


def grad_tolerance(backend, case, training, dtype, inputs, grad_out, ref_grads):
    """float32/float64: the fixed tolerance. Half types: the gradients pass through conv_out
    and dy stored in the half type, so torch itself (the reference run in that dtype) is
    off by up to a few 1e-2; a backend must be no worse than twice that, and the
    reference itself within 5e-2."""
    if dtype in (torch.float32, torch.float64):
        return {name: TOLERANCE[dtype] for name in ref_grads}
    if backend == "reference":
        return {name: 5e-2 for name in ref_grads}
    _, _, _, baseline = run("reference", case, inputs, training, grad_out)
    return {name: max(TOLERANCE[dtype], 2 * rel_err(baseline[name], ref)) for name, ref in ref_grads.items()}


def check_against_reference(backend, case, training, dtype):
    seed = zlib.crc32(f"{case.name}{training}{dtype}".encode())
    inputs = case.make(dtype, seed=seed)
    require_backend(backend, inputs, case, training)
    ref_inputs = as_double(inputs)
    if case.channels_last:
        ref_inputs[0] = ref_inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out_shape = reference.conv_output_size(inputs[0].shape, inputs[1].shape, [case.stride] * 2,
                                           [case.padding] * 2, [case.dilation] * 2)
    grad_out = torch.randn(out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref_out, ref_rm, ref_rv, ref_grads = run("reference", case, ref_inputs, training, grad_out)
    out, rm, rv, grads = run(backend, case, inputs, training, grad_out)

    tol = TOLERANCE[dtype]
    grad_tol = grad_tolerance(backend, case, training, dtype, inputs, grad_out, ref_grads)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert out.is_contiguous(memory_format=torch.channels_last if case.channels_last else torch.contiguous_format)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < tol
    assert rel_err(rm, ref_rm) < tol and rel_err(rv, ref_rv) < tol
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        assert grad.shape == ref_grad.shape and grad.dtype == dtype, name
        if name == "bias" and training:  # batch statistics cancel a conv bias: its gradient is 0
            assert grad.double().norm() < tol * grad_out.norm(), name
        else:
            assert rel_err(grad, ref_grad) < grad_tol[name], (name, rel_err(grad, ref_grad))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_float32_matches_reference(backend, case, training):
    check_against_reference(backend, case, training, torch.float32)


HALF_CASES = [c for c in CASES if c.name in ("3x3", "channels_last", "odd_channels")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_half_precision_matches_reference(backend, dtype, case, training):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("one half type suffices for the slow interpreter; fp16 and bf16 share the kernel code")
    check_against_reference(backend, case, training, dtype)
