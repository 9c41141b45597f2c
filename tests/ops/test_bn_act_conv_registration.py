"""bn_act_conv as registered ops: opcheck (schema, autograd registration, fake tensor,
AOT dispatch) of bn_act_conv, bn_act_conv_into and bn_act_conv_backward on every backend
that runs here, and torch.compile(fullgraph=True) of a pre-activation block, train and
eval, and of the out= form writing into a channel slice."""
import pytest
import torch

import cnnkernels
from bn_act_conv_cases import CASES, EPS, BnCase
from helpers import check_compile_matches_eager, rel_err
from test_bn_act_conv import BACKENDS_ON_CPU, require_backend

OPCHECK_CASES = [c for c in CASES if c.name in ("3x3s2_bias", "prefix_cl_3x3", "prefix_nchw_groups_none")]
# (case, training) pairs: each case once, train and eval both covered, to keep opcheck's cost down.
OPCHECK_RUNS = [(OPCHECK_CASES[0], False), (OPCHECK_CASES[1], True), (OPCHECK_CASES[2], True)]


def schema_args(case, training, requires_grad=True):
    inputs = case.make(requires_grad=requires_grad)
    return (*inputs, *case.schema_conv(), training, EPS, case.activation)


@pytest.mark.parametrize("case, training", OPCHECK_RUNS,
                         ids=[f"{c.name}-{'train' if t else 'eval'}" for c, t in OPCHECK_RUNS])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck(backend, case, training):
    args = schema_args(case, training)
    require_backend(backend, args[:7], case, training)
    with cnnkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.cnnkernels.bn_act_conv.default, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck_into_op(backend, training):
    case = BnCase("into", layout="prefix_cl", c_out=4, bias=True)
    args = schema_args(case, training, requires_grad=False)
    out = torch.randn(2, 4, 6, 6)
    require_backend(backend, args[:7], case, training, op="bn_act_conv_into", out=out)
    with cnnkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.cnnkernels.bn_act_conv_into.default, (out,) + args)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck_backward_op(backend):
    case = OPCHECK_CASES[1]
    args = schema_args(case, True, requires_grad=False)
    require_backend(backend, args[:7], case, True)
    with cnnkernels.use_backend(backend), torch.no_grad():
        out, mean, var = torch.ops.cnnkernels.bn_act_conv(*args)
        backward_args = (torch.randn_like(out), *args[:5], mean, var, *args[7:], [True, True, False, True, True])
        torch.library.opcheck(torch.ops.cnnkernels.bn_act_conv_backward.default, backward_args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class PreActBlock(torch.nn.Module):
    """Two pre-activation layers with a residual, as in a pre-activation ResNet block."""

    def __init__(self):
        super().__init__()
        self.a = cnnkernels.nn.BNActConv(8, 8, 3, padding=1)
        self.b = cnnkernels.nn.BNActConv(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x)) + x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_forward_and_backward(training):
    check_compile_matches_eager(PreActBlock, training, (2, 8, 6, 6))


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
