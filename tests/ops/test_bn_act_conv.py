"""The contract of bn_act_conv on every backend (reference, cpu, triton through the
interpreter; cuda on a GPU): forward and backward against the float64 reference over the
case table (x as a channel-prefix view of NCHW and channels_last buffers included),
float32 and bfloat16, train and eval (running statistics included); the out= form
writing into a channel slice of a NaN-poisoned buffer; opcheck of bn_act_conv,
bn_act_conv_into and bn_act_conv_backward; torch.compile(fullgraph=True) of a
pre-activation block and of the out= form. The machinery is tests/op_matrix.py."""
import pytest
import torch

import cnnkernels
from bn_act_conv_cases import CASES, EPS, BnCase, make_x
from cnnkernels import ops, reference
from helpers import TOLERANCE, poisoned_empty, rel_err, skip_or_fail, torch_bn_act_conv
from op_matrix import (BACKENDS, TRAINING, OpContract, TwoLayers, check_against_reference,
                       check_compile_matches_eager, device_of, opcheck, require_backend, runs)


def arguments(case, t, training):
    """ops.bn_act_conv's arguments for the case's tensors t."""
    return ((t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], t["running_mean"], t["running_var"]),
            dict(training=training, momentum=0.1, eps=EPS, **case.kwargs()))


CONTRACT = OpContract(
    "bn_act_conv", ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var"), arguments,
    torch_bn_act_conv, state=("running_mean", "running_var"), same_format_grads=("x",),
    out_format=lambda case: torch.channels_last if case.channels_last_out else torch.contiguous_format)
HALF_CASES = [c for c in CASES if c.name in ("3x3", "prefix_cl_1x1", "odd_channels")]
RUNS = runs(CASES, [torch.float32]) + runs(HALF_CASES, [torch.bfloat16])


@pytest.mark.parametrize("case, dtype, training", RUNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, case, dtype, training):
    check_against_reference(CONTRACT, backend, case, dtype, training)


@TRAINING
@pytest.mark.parametrize("layout", ["prefix", "prefix_cl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_into_writes_a_channel_slice_and_nothing_else(backend, layout, training):
    """DenseNet's use: x = buf[:, :c0], out = buf[:, c0:c0 + C_out] of one buffer whose
    other channels are NaN; only the slice changes."""
    case = BnCase("into", layout=layout, c_in=6, c_out=4, bias=True)
    device = device_of(backend)
    x_values, weight, bias, bn_weight, bn_bias, running_mean, running_var = (
        t.to(device) for t in case.make(requires_grad=False, seed=3))
    fmt = torch.channels_last if layout == "prefix_cl" else torch.contiguous_format
    buf = torch.full((2, 13, 6, 6), float("nan"), device=device).contiguous(memory_format=fmt)
    buf[:, :6] = x_values
    x, out = buf[:, :6], buf[:, 6:10]
    inputs = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    require_backend(backend, "bn_act_conv_into", *inputs, training=training, out=out, **case.kwargs())
    ref_rm, ref_rv = running_mean.double(), running_var.double()
    expected = reference.bn_act_conv_forward(x.double(), weight.double(), bias.double(), bn_weight.double(),
                                             bn_bias.double(), ref_rm, ref_rv, *case.schema_conv(), training, EPS,
                                             case.activation)[0]
    with cnnkernels.use_backend("reference"):
        ops.bn_act_conv(x.double(), weight.double(), bias.double(), bn_weight.double(), bn_bias.double(), ref_rm,
                        ref_rv, training=training, **case.kwargs())
    with cnnkernels.use_backend(backend), torch.no_grad(), poisoned_empty():
        returned = ops.bn_act_conv(*inputs, training=training, out=out, **case.kwargs())
    assert returned is out
    assert torch.equal(buf[:, :6], x_values)
    assert buf[:, 10:].isnan().all()
    assert not out.isnan().any()
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    assert rel_err(running_mean, ref_rm) < 1e-6 and rel_err(running_var, ref_rv) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_stay_exact_under_a_large_mean(backend):
    """x ~ 1000 +- 0.01 per channel: the variance must not drown in the mean."""
    case = BnCase("offset", layout="prefix_cl", hw=9)
    inputs = list(case.make(requires_grad=False, seed=5))
    gen = torch.Generator().manual_seed(7)
    values = 1000 + 0.01 * torch.randn(case.n, case.c_in, case.hw, case.hw, generator=gen, dtype=torch.float64)
    inputs[0] = make_x(values.float(), case.layout)
    inputs = [None if t is None else t.to(device_of(backend)) for t in inputs]
    require_backend(backend, "bn_act_conv", *inputs, training=True, **case.kwargs())
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


# --- the registered ops: opcheck, torch.compile ------------------------------------------

OPCHECK_CASES = [c for c in CASES if c.name in ("3x3s2_bias", "prefix_cl_3x3", "prefix_nchw_groups_none")]
# (case, training) pairs: each case once, train and eval both covered, to keep opcheck's cost down.
OPCHECK_RUNS = [(OPCHECK_CASES[0], False), (OPCHECK_CASES[1], True), (OPCHECK_CASES[2], True)]


@pytest.mark.parametrize("case, training", OPCHECK_RUNS,
                         ids=[f"{c.name}-{'train' if t else 'eval'}" for c, t in OPCHECK_RUNS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, case, training):
    CONTRACT.opcheck(backend, case, training)


@TRAINING
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_into_op(backend, training):
    case = BnCase("into", layout="prefix_cl", c_out=4, bias=True)
    out = torch.randn(2, 4, 6, 6, device=device_of(backend))
    args, kwargs, _ = CONTRACT.call(backend, case, training, requires_grad=False, op_name="bn_act_conv_into", out=out)
    opcheck(backend, "bn_act_conv_into", args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_op(backend):
    def backward_args(schema, results):
        out, mean, var = results
        return (torch.randn_like(out), *schema[:5], mean, var, *schema[7:], [True, True, False, True, True])
    CONTRACT.opcheck_backward(backend, OPCHECK_CASES[1], True, backward_args)


def pre_act_block():
    """Two pre-activation layers with a residual, as in a pre-activation ResNet block."""
    return TwoLayers(lambda: cnnkernels.nn.BNActConv(8, 8, 3, padding=1), lambda layer, y, x: layer(y) + x)


@TRAINING
def test_compile_fullgraph_forward_and_backward(training):
    check_compile_matches_eager(pre_act_block, training, (2, 8, 6, 6))


def test_compile_into_a_channel_slice_without_graph_break():
    """Inference of two dense layers writing into one channels_last feature buffer."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([cnnkernels.nn.BNActConv(4 + 4 * i, 4, 3, padding=1) for i in range(2)]).eval()

    def dense(x):
        buf = x.new_empty(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
        buf[:, :4] = x
        for i, layer in enumerate(layers):
            layer(buf[:, :4 + 4 * i], out=buf[:, 4 + 4 * i:8 + 4 * i])
        return buf

    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = dense(x)
        explanation = torch._dynamo.explain(dense)(x)
        got = torch.compile(dense, fullgraph=True, backend="aot_eager")(x)
    assert explanation.graph_break_count == 0
    assert rel_err(got, expected) < 1e-5
