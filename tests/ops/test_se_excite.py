"""The contract of se_excite on every backend (reference, cpu, triton through the
interpreter; cuda on a GPU): forward and backward against the float64 reference over
the case table, float32, bfloat16 and float64; gradients of some inputs only; opcheck of
both registered ops; torch.compile(fullgraph=True) without graph breaks. The machinery
is tests/op_matrix.py; the CUDA kernels are checked on CPU in
tests/cuda_emulation/test_se_excite_kernels.py."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cnnkernels import ops
from helpers import ShapeCase, rel_err, seeded_randn
from op_matrix import BACKENDS, OpContract, check_against_reference, check_compile_matches_eager, runs, same_layout


@dataclass(frozen=True)
class SECase(ShapeCase):
    """x of `shape` [N, C, H, W]; R = r hidden units."""
    r: int = 4
    conv_weights: bool = False  # [R, C, 1, 1] / [C, R, 1, 1] instead of [R, C] / [C, R]
    bias: bool = True
    residual: bool = False
    channels_last: bool = False

    def make(self, dtype=torch.float32, seed=0, requires_grad=True):
        """Fresh random inputs: x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual."""
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0, offset=0.0):
            return seeded_randn(gen, *shape, scale=scale, offset=offset, dtype=dtype)

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        c = self.shape[1]
        x = rand(*self.shape, offset=0.5).contiguous(memory_format=fmt)
        fc1_weight = rand(self.r, c, scale=c ** -0.5)
        fc2_weight = rand(c, self.r, scale=self.r ** -0.5)
        if self.conv_weights:
            fc1_weight, fc2_weight = fc1_weight[:, :, None, None], fc2_weight[:, :, None, None]
        fc1_bias = rand(self.r, scale=0.3, offset=0.2) if self.bias else None
        fc2_bias = rand(c, scale=0.3) if self.bias else None
        residual = rand(*self.shape).contiguous(memory_format=fmt) if self.residual else None
        inputs = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual]
        return [None if t is None else t.requires_grad_(requires_grad) for t in inputs]


SHAPE = (2, 16, 5, 6)
CASES = [
    SECase("basic", SHAPE),
    SECase("conv_weights_relu_residual", SHAPE, "relu", conv_weights=True, residual=True),
    SECase("no_bias", SHAPE, "relu", bias=False),
    SECase("channels_last_residual", SHAPE, "relu", channels_last=True, residual=True),
    SECase("channels_last_no_bias", SHAPE, channels_last=True, bias=False),
    SECase("odd", (3, 37, 3, 7), r=5, residual=True),
    SECase("wide_c", (2, 80, 2, 2), "relu", r=40, conv_weights=True),
    SECase("pixel1", (4, 8, 1, 1), "relu", r=2, residual=True),
    SECase("batch1", (1, 24, 7, 7), r=8, channels_last=True),
]


def torch_se_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual=None, activation="none"):
    """What ops.se_excite replaces, in torch's own ops and in the inputs' dtype."""
    squeezed = x.mean(dim=(2, 3))
    hidden = torch.relu(torch.nn.functional.linear(squeezed, fc1_weight.flatten(1), fc1_bias))
    gate = torch.sigmoid(torch.nn.functional.linear(hidden, fc2_weight.flatten(1), fc2_bias))
    z = x * gate[:, :, None, None]
    if residual is not None:
        z = z + residual
    return torch.relu(z) if activation == "relu" else z


def arguments(case, t, training=None):
    """ops.se_excite's arguments for the case's tensors t."""
    return ((t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"]),
            dict(residual=t["residual"], activation=case.activation))


# Half types: the gradients never held below 2e-2, as the fc gradients go through half inputs.
CONTRACT = OpContract(
    "se_excite", ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual"), arguments,
    torch_se_excite, out_format=lambda case: torch.channels_last if case.channels_last else torch.contiguous_format,
    same_format_grads=("x", "residual"), half_grad_floor=2e-2)
HALF_CASES = [c for c in CASES if c.name in ("conv_weights_relu_residual", "channels_last_residual", "odd")]
RUNS = (runs(CASES, [torch.float32], [None]) + runs(HALF_CASES, [torch.bfloat16], [None])
        + runs(HALF_CASES[:2], [torch.float64], [None]))


@pytest.mark.parametrize("case, dtype, training", RUNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, case, dtype, training):
    check_against_reference(CONTRACT, backend, case, dtype)


def test_reference_matches_plain_torch():
    """The reference itself against torch.nn.functional composed by hand (autograd)."""
    case = CASES[1]
    x, w1, b1, w2, b2, res = case.make(torch.float64)
    s = x.mean(dim=(2, 3))
    h = torch.relu(torch.nn.functional.conv2d(s[:, :, None, None], w1, b1))
    gate = torch.sigmoid(torch.nn.functional.conv2d(h, w2, b2))
    want = torch.relu(x * gate + res)
    got = ops.se_excite(x, w1, b1, w2, b2, residual=res, activation="relu")
    assert rel_err(got, want) < 1e-12
    grad = torch.randn_like(want)
    for g, e in zip(torch.autograd.grad(got, [x, w1, b1, w2, b2, res], grad),
                    torch.autograd.grad(want, [x, w1, b1, w2, b2, res], grad)):
        assert rel_err(g, e) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_gradients(backend):
    """Gradients of a subset of the inputs (the rest do not require grad)."""
    case = CASES[3]
    t = CONTRACT.make(case, torch.float32, backend, seed=3, requires_grad=False)
    CONTRACT.require(backend, case, t)
    t["fc2_weight"].requires_grad_(True)
    t["residual"].requires_grad_(True)
    t64 = {name: same_layout(v, torch.float64) for name, v in t.items()}
    got = CONTRACT.run(backend, case, t, grad_out=1)
    want = CONTRACT.run("reference", case, t64, grad_out=1)
    assert set(got) == set(want) == {"out", "fc2_weight", "residual", "grad_out"}
    for name in ("fc2_weight", "residual"):
        assert rel_err(got[name], want[name]) < 1e-4


# --- the registered ops: opcheck, torch.compile ------------------------------------------

OPCHECK_CASES = [c for c in CASES if c.name in ("conv_weights_relu_residual", "channels_last_no_bias")]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, case):
    CONTRACT.opcheck(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_op(backend):
    def backward_args(schema, results):
        out, squeezed, hidden, gate = results
        return (torch.randn_like(out), out, schema[0], schema[1], schema[3], squeezed, hidden, gate, schema[6],
                [True, True, False, True, True, True])
    CONTRACT.opcheck_backward(backend, OPCHECK_CASES[0], None, backward_args)


class Block(torch.nn.Module):
    """An SE unit with its FC weights as parameters, a residual and ReLU, as in SE-ResNet."""

    def __init__(self):
        super().__init__()
        _, w1, b1, w2, b2, _ = CASES[1].make(requires_grad=False)
        self.w1, self.b1, self.w2, self.b2 = (torch.nn.Parameter(t) for t in (w1, b1, w2, b2))

    def forward(self, x, residual):
        return ops.se_excite(x, self.w1, self.b1, self.w2, self.b2, residual=residual, activation="relu")


def test_compile_fullgraph_no_graph_break():
    case = CASES[1]
    check_compile_matches_eager(Block, True, case.shape, case.shape, grad_tol=1e-6)
