"""The contract of conv_bn_act on every backend (reference, cpu, triton through the
interpreter; cuda on a GPU): forward and backward against the float64 reference over the
case table, float32 and half precision, train and eval (running statistics included);
opcheck of the op and its backward; torch.compile(fullgraph=True). The machinery is
tests/op_matrix.py; the cpu backend's own choices are tested in
test_conv_bn_act_explain_cpu.py and test_conv_bn_act_native_cpu.py."""
import pytest
import torch

import cnnkernels
from helpers import CASES, rel_err, torch_conv_bn_act
from op_matrix import (BACKENDS, TRAINING, OpContract, TwoLayers, check_against_reference,
                       check_compile_matches_eager, runs)

CL = torch.channels_last


def arguments(case, t, training):
    """ops.conv_bn_act's arguments for the case's tensors t."""
    return ((t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], t["running_mean"], t["running_var"]),
            dict(training=training, momentum=0.1, residual=t["residual"], **case.kwargs()))


CONTRACT = OpContract(
    "conv_bn_act", ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var", "residual"),
    arguments, torch_conv_bn_act, out_format=lambda case: CL if case.channels_last else torch.contiguous_format,
    state=("running_mean", "running_var"),
    # batch statistics cancel a conv bias: its gradient is 0 in training
    vanishing_grads=lambda case, training: ("bias",) if training else ())
HALF_CASES = [c for c in CASES if c.name in ("3x3", "channels_last", "odd_channels")]
RUNS = runs(CASES, [torch.float32]) + runs(HALF_CASES, [torch.bfloat16, torch.float16])


@pytest.mark.parametrize("case, dtype, training", RUNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, case, dtype, training):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("one half type suffices for the slow interpreter; fp16 and bf16 share the kernel code")
    check_against_reference(CONTRACT, backend, case, dtype, training)


OPCHECK_CASES = [c for c in CASES if c.name in ("3x3s2", "channels_last", "odd_channels")]


@TRAINING
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, case, training):
    CONTRACT.opcheck(backend, case, training)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_op(backend):
    def backward_args(schema, results):
        out, conv_out, mean, var = results
        return (torch.randn_like(out), out, *schema[0:3], conv_out, schema[3], mean, var, *schema[7:13], schema[14],
                [True, True, False, True, True, True])
    CONTRACT.opcheck_backward(backend, OPCHECK_CASES[1], True, backward_args)


def block():
    """Two fused layers with a residual, as in a ResNet basic block."""
    return TwoLayers(lambda: cnnkernels.nn.ConvBNAct(8, 8, 3, padding=1), lambda layer, y, x: layer(y, residual=x))


@TRAINING
def test_compile_fullgraph_forward_and_backward(training):
    check_compile_matches_eager(block, training, (2, 8, 6, 6))


def test_compile_inductor_eval_has_no_graph_break():
    torch._dynamo.reset()
    model = block().eval()
    x = torch.randn(2, 8, 6, 6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
