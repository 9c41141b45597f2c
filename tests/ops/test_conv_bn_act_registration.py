"""conv_bn_act as a registered op: opcheck (schema, autograd registration, fake tensor,
AOT dispatch) on every backend that runs here, and torch.compile(fullgraph=True)."""
import pytest
import torch

import cnnkernels
from cnnkernels import ops
from helpers import CASES, check_compile_matches_eager, rel_err
from test_conv_bn_act import BACKENDS_ON_CPU, require_backend

OPCHECK_CASES = [c for c in CASES if c.name in ("3x3s2", "channels_last", "odd_channels")]


def schema_args(case, training, dtype=torch.float32):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = case.make(dtype)
    return (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, [case.stride] * 2,
            [case.padding] * 2, [case.dilation] * 2, case.groups, training, 1e-5, residual, case.activation)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck(backend, case, training):
    args = schema_args(case, training)
    require_backend(backend, case.make(), case, training)
    with cnnkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.cnnkernels.conv_bn_act.default, args)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck_backward_op(backend):
    case = OPCHECK_CASES[1]
    args = schema_args(case, True)
    require_backend(backend, case.make(), case, True)
    with cnnkernels.use_backend(backend), torch.no_grad():
        out, conv_out, mean, var = torch.ops.cnnkernels.conv_bn_act(*args)
        grad_out = torch.randn_like(out)
        backward_args = (grad_out, out, args[0], args[1], args[2], conv_out, args[3], mean, var, *args[7:13],
                         args[14], [True, True, False, True, True, True])
        torch.library.opcheck(torch.ops.cnnkernels.conv_bn_act_backward.default, backward_args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class Block(torch.nn.Module):
    """Two fused layers with a residual, as in a ResNet basic block."""

    def __init__(self):
        super().__init__()
        self.a = cnnkernels.nn.ConvBNAct(8, 8, 3, padding=1)
        self.b = cnnkernels.nn.ConvBNAct(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x), residual=x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_forward_and_backward(training):
    check_compile_matches_eager(Block, training, (2, 8, 6, 6))


def test_compile_inductor_eval_has_no_graph_break():
    torch._dynamo.reset()
    model = Block().eval()
    x = torch.randn(2, 8, 6, 6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
