"""Every backend that runs here (reference, cpu, triton via the interpreter) of bn_act_conv
against the float64 reference: forward, every gradient, running statistics, train and
eval, x as a channel-prefix view of NCHW and channels_last buffers, the out= form
writing into a channel slice of a NaN-poisoned buffer, float32 and bfloat16.

Every torch.empty inside the kernels comes back NaN-filled (deterministic mode with
fill_uninitialized_memory), so an element a kernel forgets to write shows up."""
import zlib

import pytest
import torch

import cnnkernels
from bn_act_conv_cases import CASES, EPS, GRAD_NAMES, BnCase, make_x
from cnnkernels import ops, reference
from helpers import (HALF_DTYPES, TOLERANCE, half_precision_bounds, poisoned_empty, rel_err, skip_or_fail,
                     torch_bn_act_conv)

BACKENDS_ON_CPU = ["reference", "cpu", "triton"]


@pytest.fixture(autouse=True)
def poison_empty():
    with poisoned_empty():
        yield


def require_backend(backend, inputs, case, training, op="bn_act_conv", out=None):
    """Skips when the backend cannot run here, unless the build is required to provide it."""
    kwargs = dict(training=training, **case.kwargs())
    if out is not None:
        kwargs["out"] = out
    with cnnkernels.use_backend(backend), torch.no_grad():
        verdict = ops.explain(op, *inputs, **kwargs)
    if verdict["backend"] == backend:
        return
    message = f"{backend} cannot run {op} here: {'; '.join(verdict['rejected'].get(backend, []))}"
    skip_or_fail(message) if backend != "reference" else pytest.fail(message)


def run(backend, case, inputs, training, grad_out):
    """Forward + backward through the public op; returns out, running stats and grads."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = inputs
    running_mean, running_var = running_mean.clone(), running_var.clone()
    with cnnkernels.use_backend(backend):
        out = ops.bn_act_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              training=training, momentum=0.1, **case.kwargs())
        leaves = [t for t in (x, weight, bias, bn_weight, bn_bias) if t is not None]
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, (x, weight, bias, bn_weight, bn_bias)) if t is not None]
    return out, running_mean, running_var, dict(zip(names, grads))


def as_double(inputs, case):
    """The inputs in float64, x keeping its layout (prefix views stay prefix views)."""
    doubled = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    doubled[0] = make_x(inputs[0].detach().double(), case.layout).requires_grad_()
    return doubled


def run_torch(case, inputs, training, grad_out):
    """run(), through torch's own batch_norm / relu / conv2d in the inputs' dtype instead of the op."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = [
        None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    x = make_x(x.detach(), case.layout).requires_grad_()
    out = torch_bn_act_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=training,
                            momentum=0.1, eps=EPS, **case.kwargs())
    leaves = [t for t in (x, weight, bias, bn_weight, bn_bias) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, (x, weight, bias, bn_weight, bn_bias)) if t is not None]
    return out, running_mean, running_var, dict(zip(names, grads))


def as_results(out, running_mean, running_var, grads):
    return {"out": out, "running_mean": running_mean, "running_var": running_var, **grads}


def check_against_reference(backend, case, training, dtype):
    seed = zlib.crc32(f"{case.name}{training}{dtype}".encode())
    inputs = case.make(dtype, seed=seed)
    require_backend(backend, inputs, case, training)
    ref_inputs = as_double(inputs, case)
    grad_out = torch.randn(case.n, case.c_out, case.out_hw(), case.out_hw(), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed))
    ref = run("reference", case, ref_inputs, training, grad_out)
    out, rm, rv, grads = run(backend, case, inputs, training, grad_out)
    ref_out, ref_grads = ref[0], ref[3]

    # float32 / float64: the fixed TOLERANCE. Half types: every output, running statistic and
    # gradient no worse than twice torch's own error in that dtype (z and grad_z pass through it).
    if dtype in HALF_DTYPES:
        bound = half_precision_bounds(dtype, as_results(*run_torch(case, inputs, training, grad_out)),
                                      as_results(*ref))
    else:
        bound = {name: TOLERANCE[dtype] for name in as_results(*ref)}
    fmt = torch.channels_last if case.channels_last_out else torch.contiguous_format
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert out.is_contiguous(memory_format=fmt)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < bound["out"], ("out", rel_err(out, ref_out), bound["out"])
    for name, got, want in (("running_mean", rm, ref[1]), ("running_var", rv, ref[2])):
        assert rel_err(got, want) < bound[name], (name, rel_err(got, want), bound[name])
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        assert grad.shape == ref_grad.shape and grad.dtype == dtype, name
        assert not grad.isnan().any(), name
        assert rel_err(grad, ref_grad) < bound[name], (name, rel_err(grad, ref_grad), bound[name])
    assert grads["x"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_float32_matches_reference(backend, case, training):
    check_against_reference(backend, case, training, torch.float32)


HALF_CASES = [c for c in CASES if c.name in ("3x3", "prefix_cl_1x1", "odd_channels")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_bfloat16_matches_reference(backend, case, training):
    check_against_reference(backend, case, training, torch.bfloat16)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["prefix", "prefix_cl"])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_into_writes_a_channel_slice_and_nothing_else(backend, layout, training):
    """DenseNet's use: x = buf[:, :c0], out = buf[:, c0:c0 + C_out] of one buffer whose
    other channels are NaN; only the slice changes."""
    case = BnCase("into", layout=layout, c_in=6, c_out=4, bias=True)
    x_values, weight, bias, bn_weight, bn_bias, running_mean, running_var = case.make(requires_grad=False, seed=3)
    fmt = torch.channels_last if layout == "prefix_cl" else torch.contiguous_format
    buf = torch.full((2, 13, 6, 6), float("nan")).contiguous(memory_format=fmt)
    buf[:, :6] = x_values
    x, out = buf[:, :6], buf[:, 6:10]
    inputs = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    require_backend(backend, inputs, case, training, op="bn_act_conv_into", out=out)
    ref_rm, ref_rv = running_mean.double(), running_var.double()
    expected = reference.bn_act_conv_forward(x.double(), weight.double(), bias.double(), bn_weight.double(),
                                             bn_bias.double(), ref_rm, ref_rv, *case.schema_conv(), training, EPS,
                                             case.activation)[0]
    with cnnkernels.use_backend("reference"):
        ops.bn_act_conv(x.double(), weight.double(), bias.double(), bn_weight.double(), bn_bias.double(), ref_rm,
                        ref_rv, training=training, **case.kwargs())
    with cnnkernels.use_backend(backend), torch.no_grad():
        returned = ops.bn_act_conv(*inputs, training=training, out=out, **case.kwargs())
    assert returned is out
    assert torch.equal(buf[:, :6], x_values)
    assert buf[:, 10:].isnan().all()
    assert not out.isnan().any()
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    assert rel_err(running_mean, ref_rm) < 1e-6 and rel_err(running_var, ref_rv) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_statistics_stay_exact_under_a_large_mean(backend):
    """x ~ 1000 +- 0.01 per channel: the variance must not drown in the mean."""
    case = BnCase("offset", layout="prefix_cl", hw=9)
    inputs = list(case.make(requires_grad=False, seed=5))
    gen = torch.Generator().manual_seed(7)
    values = 1000 + 0.01 * torch.randn(case.n, case.c_in, case.hw, case.hw, generator=gen, dtype=torch.float64)
    inputs[0] = make_x(values.float(), case.layout)
    require_backend(backend, inputs, case, True)
    with cnnkernels.use_backend(backend), torch.no_grad():
        _, save_mean, save_var = torch.ops.cnnkernels.bn_act_conv(*inputs, *case.schema_conv(), True, EPS, "relu")
    x64 = inputs[0].double()
    assert rel_err(save_mean, x64.mean(dim=(0, 2, 3))) < 1e-6
    assert rel_err(save_var, x64.var(dim=(0, 2, 3), unbiased=False)) < 1e-3
    assert save_mean.dtype == save_var.dtype == torch.float32


def test_cpu_backend_is_the_default_on_cpu():
    case = BnCase("default")
    inputs = case.make(requires_grad=False)
    verdict = ops.explain("bn_act_conv", *inputs, training=True, **case.kwargs())
    if verdict["backend"] != "cpu":
        skip_or_fail(f"the cpu backend cannot run here: {verdict['rejected'].get('cpu')}")
    assert "oneDNN" in verdict["kernel"]
