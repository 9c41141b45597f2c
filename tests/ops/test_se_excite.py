"""se_excite: every backend that runs here (reference, cpu, triton through the
interpreter) against the float64 reference, forward and backward, through the public op;
argument errors; opcheck of both registered ops; torch.compile without graph breaks.
The CUDA kernels are checked on CPU in tests/cuda_emulation/test_se_excite_kernels.py."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import cnnkernels
from cnnkernels import ops
from helpers import HALF_DTYPES, TOLERANCE, half_precision_bounds, rel_err, skip_or_fail

BACKENDS_ON_CPU = ["reference", "cpu", "triton"]
GRAD_NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual")


@pytest.fixture(autouse=True)
def poison_empty():
    """Every torch.empty / at::empty (cpu and triton outputs included) comes back NaN-filled,
    so an element a kernel fails to write shows up."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@dataclass(frozen=True)
class SECase:
    name: str
    n: int = 2
    c: int = 16
    h: int = 5
    w: int = 6
    r: int = 4
    conv_weights: bool = False  # [R, C, 1, 1] / [C, R, 1, 1] instead of [R, C] / [C, R]
    bias: bool = True
    residual: bool = False
    activation: str = "none"
    channels_last: bool = False

    def make(self, dtype=torch.float32, seed=0, requires_grad=True):
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0, offset=0.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)

        x = rand(self.n, self.c, self.h, self.w, offset=0.5)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fc1_weight = rand(self.r, self.c, scale=self.c ** -0.5)
        fc2_weight = rand(self.c, self.r, scale=self.r ** -0.5)
        if self.conv_weights:
            fc1_weight, fc2_weight = fc1_weight[:, :, None, None], fc2_weight[:, :, None, None]
        fc1_bias = rand(self.r, scale=0.3, offset=0.2) if self.bias else None
        fc2_bias = rand(self.c, scale=0.3) if self.bias else None
        residual = rand(self.n, self.c, self.h, self.w) if self.residual else None
        if residual is not None and self.channels_last:
            residual = residual.contiguous(memory_format=torch.channels_last)
        inputs = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual]
        if requires_grad:
            for t in inputs:
                if t is not None:
                    t.requires_grad_(True)
        return inputs


CASES = [
    SECase("basic"),
    SECase("conv_weights_relu_residual", conv_weights=True, residual=True, activation="relu"),
    SECase("no_bias", bias=False, activation="relu"),
    SECase("channels_last_residual", channels_last=True, residual=True, activation="relu"),
    SECase("channels_last_no_bias", channels_last=True, bias=False),
    SECase("odd", n=3, c=37, h=3, w=7, r=5, residual=True),
    SECase("wide_c", n=2, c=80, h=2, w=2, r=40, conv_weights=True, activation="relu"),
    SECase("pixel1", n=4, c=8, h=1, w=1, r=2, residual=True, activation="relu"),
    SECase("batch1", n=1, c=24, h=7, w=7, r=8, channels_last=True),
]


def call(inputs, case):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = inputs
    return ops.se_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual,
                         activation=case.activation)


def require_backend(backend, inputs, case):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = inputs
    with cnnkernels.use_backend(backend):
        verdict = ops.explain("se_excite", x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual,
                              activation=case.activation)
    if verdict["backend"] == backend:
        return
    message = f"{backend} cannot run here: {'; '.join(verdict['rejected'].get(backend, []))}"
    skip_or_fail(message) if backend != "reference" else pytest.fail(message)


def run(backend, case, inputs, grad_out):
    with cnnkernels.use_backend(backend):
        out = call(inputs, case)
        leaves = [t for t in inputs if t is not None]
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, inputs) if t is not None]
    return out, dict(zip(names, grads))


def as_double(inputs, channels_last):
    doubled = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    if channels_last:
        doubled[0] = doubled[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return doubled


def plain_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation):
    """What ops.se_excite replaces, in torch's own ops and in the inputs' dtype."""
    squeezed = x.mean(dim=(2, 3))
    hidden = torch.relu(torch.nn.functional.linear(squeezed, fc1_weight.flatten(1), fc1_bias))
    gate = torch.sigmoid(torch.nn.functional.linear(hidden, fc2_weight.flatten(1), fc2_bias))
    z = x * gate[:, :, None, None]
    if residual is not None:
        z = z + residual
    return torch.relu(z) if activation == "relu" else z


def run_torch(case, inputs, grad_out):
    """run(), through plain_torch in the inputs' dtype instead of the op."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = plain_torch(*inputs, case.activation)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    names = [n for n, t in zip(GRAD_NAMES, inputs) if t is not None]
    return out, dict(zip(names, grads))


def check_against_reference(backend, case, dtype):
    seed = zlib.crc32(f"{case.name}{dtype}".encode())
    inputs = case.make(dtype, seed=seed)
    require_backend(backend, inputs, case)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref_out, ref_grads = run("reference", case, as_double(inputs, case.channels_last), grad_out)
    out, grads = run(backend, case, inputs, grad_out)
    # float32 / float64: the fixed TOLERANCE. Half types: the output and every gradient no
    # worse than twice torch's own error in that dtype, and never held below the fixed
    # floors (the output TOLERANCE; the gradients 2e-2, as the fc gradients go through half inputs).
    if dtype in HALF_DTYPES:
        torch_out, torch_grads = run_torch(case, inputs, grad_out)
        bound = {**half_precision_bounds(dtype, {"out": torch_out}, {"out": ref_out}),
                 **half_precision_bounds(dtype, torch_grads, ref_grads, floor=2e-2)}
    else:
        bound = {name: TOLERANCE[dtype] for name in ("out", *ref_grads)}
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.shape == ref_out.shape and out.is_contiguous(memory_format=fmt)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < bound["out"], ("out", rel_err(out, ref_out), bound["out"])
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        assert grad.shape == ref_grad.shape and grad.dtype == dtype, name
        assert not grad.isnan().any(), name
        assert rel_err(grad, ref_grad) < bound[name], (name, rel_err(grad, ref_grad), bound[name])
        if name in ("x", "residual"):
            assert grad.is_contiguous(memory_format=fmt), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_float32_matches_reference(backend, case):
    check_against_reference(backend, case, torch.float32)


HALF_CASES = [c for c in CASES if c.name in ("conv_weights_relu_residual", "channels_last_residual", "odd")]


@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_bfloat16_matches_reference(backend, case):
    check_against_reference(backend, case, torch.bfloat16)


@pytest.mark.parametrize("case", HALF_CASES[:2], ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_float64_matches_reference(backend, case):
    check_against_reference(backend, case, torch.float64)


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


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_only_some_gradients(backend):
    """Gradients of a subset of the inputs (the rest do not require grad)."""
    case = CASES[3]
    inputs = case.make(torch.float32, seed=3, requires_grad=False)
    require_backend(backend, inputs, case)
    x, w1, b1, w2, b2, res = inputs
    w2.requires_grad_(True)
    res.requires_grad_(True)
    ref_inputs = as_double(inputs, True)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    with cnnkernels.use_backend(backend):
        got = torch.autograd.grad(call(inputs, case), [w2, res], grad_out.float())
    want = torch.autograd.grad(call(ref_inputs, case), [ref_inputs[3], ref_inputs[5]], grad_out)
    for g, e in zip(got, want):
        assert rel_err(g, e) < 1e-4


# --- errors ------------------------------------------------------------------------------

def _good():
    return SECase("errors", residual=True).make(requires_grad=False)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(0, a[0][0]), "x must be 4-D"),
    (lambda a: a.__setitem__(0, a[0].int()), "x must be a floating tensor"),
    (lambda a: a.__setitem__(1, a[1][:, :5]), "fc1_weight must have shape"),
    (lambda a: a.__setitem__(1, a[1][:, :, None, None].expand(-1, -1, 3, 3)), "fc1_weight must be"),
    (lambda a: a.__setitem__(1, a[1].double()), "fc1_weight has dtype"),
    (lambda a: a.__setitem__(2, a[2][:3]), "fc1_bias must have 4 elements"),
    (lambda a: a.__setitem__(3, a[3][:, :3]), "fc2_weight must have shape"),
    (lambda a: a.__setitem__(3, a[3][:5]), "fc2_weight must have shape"),
    (lambda a: a.__setitem__(4, a[4][None]), "fc2_bias must be 1-D"),
    (lambda a: a.__setitem__(5, a[5][:, :3]), "residual must have x's shape"),
    (lambda a: a.__setitem__(5, a[5].double()), "residual has dtype"),
    (lambda a: a.__setitem__(0, a[0][:, :, :0]), "at least one channel and one pixel"),
], ids=["x_ndim", "x_dtype", "fc1_cols", "fc1_kernel", "fc1_dtype", "fc1_bias", "fc2_cols", "fc2_rows",
        "fc2_bias_ndim", "residual_shape", "residual_dtype", "x_empty"])
def test_bad_arguments_name_the_argument(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.se_excite(*args[:5], residual=args[5])


def test_bad_activation():
    args = _good()
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.se_excite(*args[:5], residual=args[5], activation="gelu")


def test_native_cpu_errors_name_the_argument():
    from cnnkernels import _library
    if not _library.has_native_kernel("_se_excite_forward_native", "CPU"):
        skip_or_fail("cnnkernels._C with the se_excite CPU kernels is not built")
    x, w1, b1, w2, b2, res = _good()
    native = torch.ops.cnnkernels._se_excite_forward_native
    with pytest.raises(RuntimeError, match="fc2_weight must have shape"):
        native(x, w1, b1, w2[:, :3], b2, res, "none")
    with pytest.raises(RuntimeError, match="fc1_bias must have 4 elements"):
        native(x, w1, b1[:3], w2, b2, res, "none")
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        native(x, w1, b1, w2, b2, res[:1], "none")
    with pytest.raises(RuntimeError, match="activation must be"):
        native(x, w1, b1, w2, b2, res, "gelu")


# --- registration ------------------------------------------------------------------------

def schema_args(case, dtype=torch.float32):
    x, w1, b1, w2, b2, res = case.make(dtype)
    return (x, w1.flatten(1), b1, w2.flatten(1), b2, res, case.activation)


OPCHECK_CASES = [c for c in CASES if c.name in ("conv_weights_relu_residual", "channels_last_no_bias")]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck(backend, case):
    args = schema_args(case)
    require_backend(backend, case.make(), case)
    with cnnkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.cnnkernels.se_excite.default, args)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck_backward_op(backend):
    case = OPCHECK_CASES[0]
    args = schema_args(case)
    require_backend(backend, case.make(), case)
    with cnnkernels.use_backend(backend), torch.no_grad():
        out, squeezed, hidden, gate = torch.ops.cnnkernels.se_excite(*args)
        backward_args = (torch.randn_like(out), out, args[0], args[1], args[3], squeezed, hidden, gate,
                         case.activation, [True, True, False, True, True, True])
        torch.library.opcheck(torch.ops.cnnkernels.se_excite_backward.default, backward_args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    x, w1, b1, w2, b2, res = CASES[1].make(requires_grad=False)

    def block(x, res):
        return ops.se_excite(x, w1, b1, w2, b2, residual=res, activation="relu")

    explanation = torch._dynamo.explain(block)(x, res)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    xg = x.clone().requires_grad_()
    got = compiled(xg, res)
    xe = x.clone().requires_grad_()
    want = block(xe, res)
    assert rel_err(got, want) < 1e-6
    grad = torch.randn_like(want)
    assert rel_err(torch.autograd.grad(got, xg, grad)[0], torch.autograd.grad(want, xe, grad)[0]) < 1e-6


def test_explain_names_every_backend():
    x, w1, b1, w2, b2, res = _good()
    verdict = ops.explain("se_excite", x, w1, b1, w2, b2, residual=res)
    assert verdict["op"] == "se_excite" and verdict["backend"] in ("cpu", "reference")
    assert "cuda" in verdict["rejected"]
