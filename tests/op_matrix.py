"""The machinery every op's contract test (tests/ops/test_<op>.py) shares: the backends,
running an op forward and backward on one of them, comparing against the float64
reference with the project's tolerances (helpers.half_precision_bound for half types),
and the opcheck and torch.compile drivers. An op module supplies an OpContract (how its
case tensors become a call of cnnkernels.ops.<op>, and the plain-torch sequence it
replaces) and its case table."""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import cnnkernels
from cnnkernels import ops
from cnnkernels.ops._registration import PUBLIC_CALLS
from helpers import HALF_DTYPES, TOLERANCE, half_precision_bound, poisoned_empty, rel_err, skip_or_fail

BACKENDS = ("reference", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu))
"""Every backend: triton runs through Triton's interpreter on CPU tensors; cuda needs a GPU."""
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
OPCHECK_UTILS_BACKWARD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
"""opcheck's tests for a backward op (it has no autograd of its own)."""


def device_of(backend: str) -> str:
    """The device a backend's inputs live on."""
    return "cuda" if backend == "cuda" else "cpu"


def same_layout(t, dtype=None, device=None, requires_grad=None):
    """A copy of t (a leaf) in `dtype` on `device` with t's strides: a view of a wider
    buffer (a channel prefix) stays such a view of a copy of that buffer."""
    if t is None:
        return None
    requires_grad = t.requires_grad if requires_grad is None else requires_grad
    t, to = t.detach(), dict(dtype=dtype or t.dtype, device=device or t.device, copy=True)
    if _dense(t):
        copied = t.to(**to)
    else:  # copy the whole storage, then view it as t views its own
        storage = t.untyped_storage()
        whole = t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
        copied = whole.to(**to).as_strided(t.shape, t.stride(), t.storage_offset())
    assert copied.stride() == t.stride()
    return copied.detach().requires_grad_(requires_grad)


def _dense(t) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def require_backend(backend: str, op_name: str, *args, **kwargs) -> None:
    """Skips when `backend` cannot run ops.<op_name>(*args, **kwargs) here (fails where the
    build must provide it, see helpers.skip_or_fail); the reference must always run."""
    with cnnkernels.use_backend(backend), torch.no_grad():
        verdict = ops.explain(op_name, *args, **kwargs)
    if verdict["backend"] == backend:
        return
    message = f"{backend} cannot run {op_name} here: {'; '.join(verdict['rejected'].get(backend, []))}"
    skip_or_fail(message) if backend != "reference" else pytest.fail(message)


@dataclass(frozen=True)
class OpContract:
    """How the contract tests call one op. inputs: the names of the tensors case.make()
    returns, in order; arguments(case, inputs, training) -> (args, kwargs) of
    cnnkernels.ops.<op> for {name: tensor}; twin: torch's own ops with the op's signature,
    run in the inputs' dtype (what the op replaces); out_format(case): out's memory format;
    state: inputs the op updates in place (running statistics), compared as results;
    same_format_grads: gradients that come in out's memory format; vanishing_grads(case,
    training): gradients that are exactly 0 (measured against grad_out's norm);
    half_grad_floor: the least bound of a half-precision gradient (TOLERANCE by default)."""
    op: str
    inputs: tuple
    arguments: Callable
    twin: Callable
    out_format: Callable
    state: tuple = ()
    same_format_grads: tuple = ()
    vanishing_grads: Callable = lambda case, training: ()
    half_grad_floor: float | None = None

    def make(self, case, dtype, backend="cpu", seed=11, requires_grad=True) -> dict:
        """case.make()'s fresh random tensors by name, on the backend's device."""
        made = case.make(dtype, seed=seed, requires_grad=requires_grad)
        return {name: same_layout(t, device=device_of(backend)) for name, t in zip(self.inputs, made)}

    def require(self, backend, case, inputs, training=None):
        args, kwargs = self.arguments(case, inputs, training)
        require_backend(backend, self.op, *args, **kwargs)

    def run(self, backend, case, inputs, training=None, grad_out=0, fn=None) -> dict:
        """Forward and backward of ops.<op> (or fn, of the same signature) on `backend` (None:
        the default) with fresh copies of the state inputs: {"out", each state input,
        each gradient by input name, "grad_out"}; grad_out: a tensor, or the seed of one."""
        inputs = {name: same_layout(t) if name in self.state else t for name, t in inputs.items()}
        args, kwargs = self.arguments(case, inputs, training)
        leaves = {name: t for name, t in inputs.items() if t is not None and t.requires_grad}
        with cnnkernels.use_backend(backend):
            out = (fn or getattr(ops, self.op))(*args, **kwargs)
            if not isinstance(grad_out, torch.Tensor):
                gen = torch.Generator().manual_seed(grad_out)
                grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
            grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
        return {"out": out, **{name: inputs[name] for name in self.state}, **dict(zip(leaves, grads)),
                "grad_out": grad_out}

    def call(self, backend, case, training=None, requires_grad=True, op_name=None, **extra):
        """Fresh float32 tensors of case on the backend's device as a public call: (args,
        kwargs) of ops.<op> (kwargs with `extra`), and its schema arguments."""
        t = self.make(case, torch.float32, backend, requires_grad=requires_grad)
        args, kwargs = self.arguments(case, t, training)
        kwargs = dict(kwargs, **extra)
        return args, kwargs, PUBLIC_CALLS[op_name or self.op].normalize(*args, **kwargs)

    def opcheck(self, backend, case, training=None):
        """opcheck of the registered op on the case's float32 tensors, with `backend` forced."""
        args, kwargs, _ = self.call(backend, case, training)
        opcheck(backend, self.op, args, kwargs)

    def opcheck_backward(self, backend, case, training, backward_args):
        """opcheck of the registered <op>_backward on backward_args(schema arguments, forward
        results), from a forward of the op on the case's float32 tensors, `backend` forced."""
        args, kwargs, schema = self.call(backend, case, training, requires_grad=False)
        require_backend(backend, self.op, *args, **kwargs)
        with cnnkernels.use_backend(backend), torch.no_grad():
            results = getattr(torch.ops.cnnkernels, self.op)(*schema)
        opcheck(backend, self.op, args, kwargs, getattr(torch.ops.cnnkernels, f"{self.op}_backward").default,
                backward_args(schema, results), OPCHECK_UTILS_BACKWARD)

    def error(self, name, got, want, grad_out, vanishing) -> float:
        """rel_err, or for a vanishing gradient its norm against grad_out's."""
        if name in vanishing:
            return (got.double().norm() / grad_out.double().norm()).item()
        return rel_err(got, want)


def seed_of(*key) -> int:
    """A seed fixed by the test's parameters."""
    return zlib.crc32("".join(map(str, key)).encode())


def check_against_reference(contract: OpContract, backend: str, case, dtype: torch.dtype, training=None):
    """Runs `case` forward and backward on `backend` in `dtype` and on the float64 reference
    (same values, same layout) and asserts: out has the dtype, shape and memory format and
    no NaN (every torch.empty, in the kernels too, comes back NaN-filled: helpers.poisoned_empty);
    out, the state and
    every gradient are within TOLERANCE[dtype] of the reference, or for half types within
    half_precision_bound of the error the op's plain-torch twin reaches in that dtype.
    Returns (results, reference results, inputs)."""
    with poisoned_empty():
        return _check_against_reference(contract, backend, case, dtype, training)


def _check_against_reference(contract, backend, case, dtype, training):
    seed = seed_of(case.name, training, dtype)
    inputs = contract.make(case, dtype, backend, seed)
    contract.require(backend, case, inputs, training)
    ref = contract.run("reference", case, {k: same_layout(v, torch.float64) for k, v in inputs.items()},
                       training, grad_out=seed)
    got = contract.run(backend, case, inputs, training, grad_out=ref["grad_out"])
    grad_out = ref.pop("grad_out")
    vanishing = contract.vanishing_grads(case, training)
    names = list(ref)
    grad_names = [name for name in names if name in contract.inputs and name not in contract.state]
    if dtype in HALF_DTYPES:
        twin = contract.run(None, case, inputs, training, grad_out=grad_out, fn=contract.twin)
        bound = {name: half_precision_bound(contract.error(name, twin[name], ref[name], grad_out, vanishing), dtype,
                                            contract.half_grad_floor if name in grad_names else None)
                 for name in names}
    else:
        bound = dict.fromkeys(names, TOLERANCE[dtype])
    out, fmt = got["out"], contract.out_format(case)
    assert out.dtype == dtype and out.shape == ref["out"].shape
    assert out.is_contiguous(memory_format=fmt)
    for name in names:
        value = got[name]
        assert value.shape == ref[name].shape, name
        if name in grad_names:
            assert value.dtype == dtype, name
        assert not value.isnan().any(), name
        err = contract.error(name, value, ref[name], grad_out, vanishing)
        assert err < bound[name], (name, err, bound[name])
    for name in contract.same_format_grads:
        if name in got:
            assert got[name].is_contiguous(memory_format=fmt), name
    return got, ref, inputs


def runs(cases, dtypes, trainings=(True, False)) -> list:
    """pytest params (case, dtype, training) of every case in every dtype and mode."""
    return [pytest.param(case, dtype, training, id=f"{case.name}-{str(dtype)[6:]}-{mode_id(training)}")
            for dtype in dtypes for case in cases for training in trainings]


def mode_id(training) -> str:
    return {True: "train", False: "eval", None: "-"}[training]


def opcheck(backend: str, op_name: str, args, kwargs, op=None, schema_args=None, test_utils=None) -> None:
    """torch.library.opcheck, with `backend` forced (skipped where it cannot run
    ops.<op_name>(*args, **kwargs)), of the registered op `op` (default: the op itself) on
    schema_args (default: the schema arguments that public call normalises to)."""
    require_backend(backend, op_name, *args, **kwargs)
    if schema_args is None:
        schema_args = PUBLIC_CALLS[op_name].normalize(*args, **kwargs)
    op = getattr(torch.ops.cnnkernels, op_name).default if op is None else op
    with cnnkernels.use_backend(backend):
        torch.library.opcheck(op, schema_args, **({} if test_utils is None else {"test_utils": test_utils}))


class TwoLayers(torch.nn.Module):
    """Two fused layers of make_layer() and a shortcut, as in a ResNet basic block:
    join(second layer, first layer(x), x)."""

    def __init__(self, make_layer, join):
        super().__init__()
        self.a, self.b, self.join = make_layer(), make_layer(), join

    def forward(self, x):
        return self.join(self.b, self.a(x), x)


def check_compile_matches_eager(make_model, training: bool, *shapes, exact=False, grad_tol=1e-5) -> None:
    """torch.compile(fullgraph=True, backend="aot_eager") of make_model() against a copy run
    eagerly, on random inputs of `shapes`: no graph break; the output, the gradients of
    every input and parameter, and the updated state (running statistics) agree (exact:
    bit for bit; else within 1e-6, gradients within grad_tol), in train or eval mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled_model = make_model(), make_model()
    compiled_model.load_state_dict(eager.state_dict())
    eager.train(training), compiled_model.train(training)
    inputs = [torch.randn(*shape, requires_grad=True) for shape in shapes]
    explanation = torch._dynamo.explain(copy.deepcopy(compiled_model))(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    expected, got = eager(*inputs), compiled(*inputs)
    assert torch.equal(got, expected) if exact else rel_err(got, expected) < 1e-6
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs + list(eager.parameters()), grad)
    got_grads = torch.autograd.grad(got, inputs + list(compiled_model.parameters()), grad)
    for e, g in zip(expected_grads, got_grads, strict=True):
        assert torch.equal(g, e) if exact else rel_err(g, e) < grad_tol
    for key, value in eager.state_dict().items():  # running statistics were updated alike
        assert torch.allclose(compiled_model.state_dict()[key].float(), value.float(), atol=1e-6), key
