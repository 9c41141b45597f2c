"""The contract of add_act on every backend (reference, cpu, triton through the
interpreter; cuda on a GPU): forward and backward against the float64 reference over
the case table (memory formats, views, any ndim) in every dtype, bit-exact with the
reference in the inputs' dtype; the backward op on its own; opcheck of both ops;
torch.compile(fullgraph=True). The machinery is tests/op_matrix.py; the CUDA kernels
themselves are checked through the host emulation in tests/cuda_emulation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import cnnkernels
from cnnkernels import ops, reference
from helpers import ShapeCase, poisoned_empty
from op_matrix import (BACKENDS, OpContract, check_against_reference, check_compile_matches_eager, device_of,
                       require_backend, runs)

CL = torch.channels_last


@dataclass(frozen=True)
class Case(ShapeCase):
    """x and residual of `shape`, each laid out as nchw, nhwc or slice (a channel-prefix
    view of a wider buffer)."""
    x_format: str = "nchw"
    res_format: str = "nchw"

    def make(self, dtype, seed, requires_grad=True):
        gen = torch.Generator().manual_seed(seed)
        return tuple(self._make(layout, dtype, gen).requires_grad_(requires_grad)
                     for layout in (self.x_format, self.res_format))

    def _make(self, layout, dtype, gen):
        if layout == "slice":
            n, c, *rest = self.shape
            wide = torch.randn(n, c + 3, *rest, generator=gen, dtype=torch.float64).to(dtype)
            return wide[:, :c].detach()
        t = torch.randn(self.shape, generator=gen, dtype=torch.float64).to(dtype)
        return t.contiguous(memory_format=CL) if layout == "nhwc" else t

    def expected_format(self):
        return CL if self.x_format == "nhwc" else torch.contiguous_format


def torch_add_act(x, residual, *, activation="relu"):
    """What ops.add_act replaces, in torch's own ops and the inputs' dtype."""
    out = x + residual
    return torch.relu(out) if activation == "relu" else out


CONTRACT = OpContract("add_act", ("x", "residual"),
                      lambda case, t, training: ((t["x"], t["residual"]), dict(activation=case.activation)),
                      torch_add_act, out_format=Case.expected_format)
SHAPES = [
    Case("nchw", (2, 8, 8, 8)),
    Case("channels_last", (2, 8, 8, 8), x_format="nhwc", res_format="nhwc"),
    Case("mixed_x_cl", (2, 6, 5, 7), x_format="nhwc", res_format="nchw"),
    Case("mixed_res_cl", (2, 6, 5, 7), x_format="nchw", res_format="nhwc"),
    Case("odd_3366", (2, 3, 33, 17), x_format="nhwc", res_format="nhwc"),  # not a multiple of any block size
    Case("slice_view", (2, 5, 4, 3), x_format="slice", res_format="nchw"),
    Case("one_channel", (3, 1, 5, 5), x_format="nchw", res_format="nchw"),
    Case("1d", (1000,)),
    Case("3d", (4, 7, 3)),
]
CASES = [dataclasses.replace(case, name=f"{case.name}-{activation}", activation=activation)
         for case in SHAPES for activation in ("relu", "none")]
RUNS = runs(CASES, [torch.float32, torch.float64, torch.bfloat16, torch.float16], trainings=[None])


@pytest.mark.parametrize("case, dtype, training", RUNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, case, dtype, training):
    got, ref, inputs = check_against_reference(CONTRACT, backend, case, dtype)
    # The sum in float32 (float64) rounded once to dtype: bit-exact with the reference in dtype,
    # except that Triton's interpreter rounds float32 -> bfloat16 by truncation (compiled
    # Triton rounds to nearest even): there, within one bfloat16 ulp.
    out = got["out"].detach()
    expected = reference.add_act_forward(inputs["x"].detach(), inputs["residual"].detach(), case.activation)
    if backend == "triton" and dtype == torch.bfloat16:
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7).all()
    else:
        assert torch.equal(out, expected)
    # The mask out > 0 agrees exactly (rounding keeps the sign of the sum), so the
    # gradient is grad_out rounded to dtype: exact up to that rounding.
    for name in ("x", "residual"):
        assert torch.equal(got[name], ref[name].to(dtype)), name


def test_reference_matches_torch_autograd():
    """The reference itself, in float64, against torch's own add / relu and autograd."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen).contiguous(memory_format=CL)
    residual = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
    grad_out = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
    for activation, act in (("relu", torch.relu), ("none", lambda t: t)):
        xa, ra = x.clone().requires_grad_(), residual.clone().requires_grad_()
        expected = act(xa + ra)
        expected_grads = torch.autograd.grad(expected, [xa, ra], grad_out)
        out = reference.add_act_forward(x, residual, activation)
        grad = reference.add_act_backward(grad_out, out, activation)
        assert torch.equal(out, expected) and out.is_contiguous(memory_format=CL)
        assert all(torch.equal(grad, g) for g in expected_grads)


@pytest.mark.parametrize("wanted", [(True, False), (False, True), (True, True)], ids=["x", "residual", "both"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_gradients_go_to_exactly_the_inputs_that_want_them(activation, wanted):
    gen = torch.Generator().manual_seed(5)
    x, residual, grad_out = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    inputs = [t.clone().requires_grad_(w) for t, w in zip((x, residual), wanted)]
    ops.add_act(*inputs, activation=activation).backward(grad_out)
    total = x + residual
    expected = grad_out * (total > 0) if activation == "relu" else grad_out
    for t, w in zip(inputs, wanted):
        assert (t.grad is not None) == w
        assert t.grad is None or torch.equal(t.grad, expected)


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_directly(backend, activation):
    """add_act_backward on its own: a new tensor (never grad_out), in out's format, also
    for an expanded (stride 0) and a differently laid out grad_out."""
    gen = torch.Generator().manual_seed(3)
    device = device_of(backend)
    x = torch.randn(2, 3, 5, 7, generator=gen).contiguous(memory_format=CL).to(device)
    residual = torch.randn(2, 3, 5, 7, generator=gen).to(device)
    require_backend(backend, "add_act", x, residual, activation=activation)
    with cnnkernels.use_backend(backend), poisoned_empty():
        out = torch.ops.cnnkernels.add_act(x, residual, activation)
        for grad_out in (torch.randn(2, 3, 5, 7, generator=gen), torch.ones(()).expand(2, 3, 5, 7),
                         torch.randn(2, 3, 5, 7, generator=gen).contiguous(memory_format=CL)):
            grad_out = grad_out.to(device)
            grad = torch.ops.cnnkernels.add_act_backward(grad_out, out, activation)
            expected = reference.add_act_backward(grad_out, out, activation)
            assert grad.data_ptr() != grad_out.data_ptr()
            assert grad.is_contiguous(memory_format=CL)
            assert torch.equal(grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_nan_and_zero_size(backend):
    device = device_of(backend)
    x = torch.tensor([float("nan"), -1.0, 2.0, float("-inf"), 0.5], device=device)
    residual = torch.tensor([0.0, 0.5, 1.0, 1.0, -0.5], device=device)
    require_backend(backend, "add_act", x, residual)
    with cnnkernels.use_backend(backend), poisoned_empty():
        out = ops.add_act(x, residual)
        empty = ops.add_act(torch.randn(0, 4, 2, 2, device=device), torch.randn(0, 4, 2, 2, device=device))
    assert out[0].isnan() and out[1:].tolist() == [0.0, 3.0, 0.0, 0.0]
    assert empty.shape == (0, 4, 2, 2)


# --- registered op: opcheck, torch.compile ----------------------------------------------

OPCHECK_CASES = [c for c in CASES if c.name.rsplit("-", 1)[0] in ("channels_last", "mixed_res_cl", "odd_3366", "3d")]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, case):
    CONTRACT.opcheck(backend, case)


@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith("mixed_x_cl")], ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_op(backend, case):
    CONTRACT.opcheck_backward(backend, case, None,
                              lambda schema, out: (torch.randn_like(out), out, case.activation))


class Block(torch.nn.Module):
    """Two add_act calls in a row, as a residual network chains them."""

    def forward(self, a, b, c):
        return ops.add_act(ops.add_act(a, b), c, activation="none")


def test_compile_fullgraph_forward_and_backward():
    check_compile_matches_eager(Block, True, *[(2, 4, 5, 5)] * 3, exact=True)
