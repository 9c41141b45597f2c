"""Every backend of conv_bn_act against the float64 reference, forward and backward,
train and eval (running statistics included), on fresh random inputs. float32 within
TOLERANCE; half precision within helpers.half_precision_bound of the error torch's own
conv2d / batch_norm / relu reach in that dtype on this machine (torch_conv_bn_act)."""
import zlib

import pytest
import torch

import cnnkernels
from cnnkernels import ops, reference
from helpers import (CASES, HALF_DTYPES, TOLERANCE, half_precision_bound, half_precision_bounds, rel_err,
                     skip_or_fail, torch_conv_bn_act)

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


def run_torch(case, inputs, training, grad_out):
    """run(), through torch's own conv2d / batch_norm / relu in the inputs' dtype instead of the op."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = [
        None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = torch_conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=training,
                            momentum=0.1, residual=residual, **case.kwargs())
    leaves = [t for t in (x, weight, bias, bn_weight, bn_bias, residual) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, (x, weight, bias, bn_weight, bn_bias, residual)) if t is not None]
    return out, running_mean, running_var, dict(zip(names, grads))


def as_results(out, running_mean, running_var, grads):
    return {"out": out, "running_mean": running_mean, "running_var": running_var, **grads}


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
    ref = run("reference", case, ref_inputs, training, grad_out)
    out, rm, rv, grads = run(backend, case, inputs, training, grad_out)
    ref_out, ref_grads = ref[0], ref[3]

    # float32 / float64: the fixed TOLERANCE. Half types: every output, running statistic and
    # gradient no worse than twice torch's own error in that dtype (conv_out and dy pass through
    # the half type; oneDNN's bf16 path, where the CPU has one, rounds differently).
    if dtype in HALF_DTYPES:
        torch_run = run_torch(case, inputs, training, grad_out)
        bound = half_precision_bounds(dtype, as_results(*torch_run), as_results(*ref))
        bias_bound = half_precision_bound((torch_run[3]["bias"].double().norm() / grad_out.norm()).item(), dtype) \
            if "bias" in torch_run[3] else None
    else:
        bound = {name: TOLERANCE[dtype] for name in as_results(*ref)}
        bias_bound = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert out.is_contiguous(memory_format=torch.channels_last if case.channels_last else torch.contiguous_format)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < bound["out"], ("out", rel_err(out, ref_out), bound["out"])
    for name, got, want in (("running_mean", rm, ref[1]), ("running_var", rv, ref[2])):
        assert rel_err(got, want) < bound[name], (name, rel_err(got, want), bound[name])
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        assert grad.shape == ref_grad.shape and grad.dtype == dtype, name
        if name == "bias" and training:  # batch statistics cancel a conv bias: its gradient is 0
            assert grad.double().norm() < bias_bound * grad_out.norm(), name
        else:
            assert rel_err(grad, ref_grad) < bound[name], (name, rel_err(grad, ref_grad), bound[name])


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
