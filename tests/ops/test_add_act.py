"""add_act on every backend that runs here (reference, cpu via cnnkernels._C, triton via
the interpreter) against the float64 reference, forward and backward, on fresh random
inputs; memory formats; bad arguments; opcheck and torch.compile.

The CUDA kernels themselves are checked through the host emulation in
tests/cuda_emulation/test_add_act_kernels.py."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import cnnkernels
from cnnkernels import _library, ops, reference
from helpers import HALF_DTYPES, TOLERANCE, half_precision_bound, rel_err, skip_or_fail

BACKENDS_ON_CPU = ["reference", "cpu", "triton"]
CL = torch.channels_last


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    x_format: str = "nchw"  # nchw | nhwc | slice (a channel-prefix view of a wider buffer)
    res_format: str = "nchw"

    def make(self, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return (self._make(self.x_format, dtype, gen), self._make(self.res_format, dtype, gen))

    def _make(self, layout, dtype, gen):
        if layout == "slice":
            n, c, *rest = self.shape
            wide = torch.randn(n, c + 3, *rest, generator=gen, dtype=torch.float64).to(dtype)
            return wide[:, :c]
        t = torch.randn(self.shape, generator=gen, dtype=torch.float64).to(dtype)
        return t.contiguous(memory_format=CL) if layout == "nhwc" else t

    def expected_format(self):
        return CL if self.x_format == "nhwc" else torch.contiguous_format


CASES = [
    Case("nchw", (2, 8, 8, 8)),
    Case("channels_last", (2, 8, 8, 8), "nhwc", "nhwc"),
    Case("mixed_x_cl", (2, 6, 5, 7), "nhwc", "nchw"),
    Case("mixed_res_cl", (2, 6, 5, 7), "nchw", "nhwc"),
    Case("odd_3366", (2, 3, 33, 17), "nhwc", "nhwc"),  # not a multiple of any block size
    Case("slice_view", (2, 5, 4, 3), "slice", "nchw"),
    Case("one_channel", (3, 1, 5, 5), "nchw", "nchw"),
    Case("1d", (1000,)),
    Case("3d", (4, 7, 3)),
]
CASE_IDS = [c.name for c in CASES]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]


class _PoisonedTorch:
    """torch, except that empty / empty_like return NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.fixture(autouse=True)
def poisoned_triton_buffers(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN."""
    try:
        from cnnkernels.triton import add_act as triton_add_act
    except ImportError:
        return
    monkeypatch.setattr(triton_add_act, "torch", _PoisonedTorch())


def require_backend(backend, x, residual, activation="relu"):
    """Skips when the backend cannot run here, unless the build is required to provide it."""
    with cnnkernels.use_backend(backend):
        verdict = ops.explain("add_act", x, residual, activation=activation)
    if verdict["backend"] == backend:
        return
    message = f"{backend} cannot run here: {'; '.join(verdict['rejected'].get(backend, []))}"
    skip_or_fail(message) if backend != "reference" else pytest.fail(message)


def run(backend, x, residual, activation, grad_out):
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_()
    with cnnkernels.use_backend(backend):
        out = ops.add_act(x, residual, activation=activation)
        grad_x, grad_res = torch.autograd.grad(out, [x, residual], grad_out.to(out.dtype))
    return out, grad_x, grad_res


def run_torch(x, residual, activation, grad_out):
    """run(), through torch's own add (and relu) in the inputs' dtype instead of the op."""
    x, residual = x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    out = x + residual
    if activation == "relu":
        out = torch.relu(out)
    return (out, *torch.autograd.grad(out, [x, residual], grad_out.to(out.dtype)))


def as_double(t):
    fmt = CL if reference.output_memory_format(t) == CL else torch.contiguous_format
    return t.double().contiguous(memory_format=fmt)


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_matches_float64_reference(backend, case, dtype, activation):
    seed = zlib.crc32(f"{case.name}{dtype}{activation}".encode())
    x, residual = case.make(dtype, seed)
    require_backend(backend, x, residual, activation)
    grad_out = torch.randn(case.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref_out, ref_gx, ref_gr = run("reference", as_double(x), as_double(residual), activation, grad_out)
    out, grad_x, grad_res = run(backend, x, residual, activation, grad_out)
    # float32 / float64: the fixed TOLERANCE. Half types: output and gradients no worse than
    # twice torch's own x + residual (-> relu) in that dtype.
    if dtype in HALF_DTYPES:
        bound = [half_precision_bound(rel_err(t, r), dtype)
                 for t, r in zip(run_torch(x, residual, activation, grad_out), (ref_out, ref_gx, ref_gr))]
    else:
        bound = [TOLERANCE[dtype]] * 3

    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=case.expected_format())
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < bound[0]
    # The sum in float32 (float64) rounded once to dtype: bit-exact with the reference in dtype,
    # except that Triton's interpreter rounds float32 -> bfloat16 by truncation (compiled
    # Triton rounds to nearest even): there, within one bfloat16 ulp.
    expected = reference.add_act_forward(x, residual, activation)
    if backend == "triton" and dtype == torch.bfloat16 and x.device.type == "cpu":
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7).all()
    else:
        assert torch.equal(out, expected)
    for grad, ref, grad_bound in ((grad_x, ref_gx, bound[1]), (grad_res, ref_gr, bound[2])):
        assert grad.dtype == dtype and grad.shape == x.shape
        assert not grad.isnan().any()
        # The mask out > 0 agrees exactly (rounding keeps the sign of the sum), so the
        # gradient is grad_out rounded to dtype: exact up to that rounding.
        assert rel_err(grad, ref) < grad_bound
        assert torch.equal(grad, ref.to(dtype))


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


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_backward_op_directly(backend, activation):
    """add_act_backward on its own: a new tensor (never grad_out), in out's format, also
    for an expanded (stride 0) and a differently laid out grad_out."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 7, generator=gen).contiguous(memory_format=CL)
    residual = torch.randn(2, 3, 5, 7, generator=gen)
    require_backend(backend, x, residual, activation)
    with cnnkernels.use_backend(backend):
        out = torch.ops.cnnkernels.add_act(x, residual, activation)
        for grad_out in (torch.randn(2, 3, 5, 7, generator=gen), torch.ones(()).expand(2, 3, 5, 7),
                         torch.randn(2, 3, 5, 7, generator=gen).contiguous(memory_format=CL)):
            grad = torch.ops.cnnkernels.add_act_backward(grad_out, out, activation)
            expected = reference.add_act_backward(grad_out, out, activation)
            assert grad.data_ptr() != grad_out.data_ptr()
            assert grad.is_contiguous(memory_format=CL)
            assert torch.equal(grad, expected)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_relu_keeps_nan_and_zero_size(backend):
    x = torch.tensor([float("nan"), -1.0, 2.0, float("-inf"), 0.5])
    residual = torch.tensor([0.0, 0.5, 1.0, 1.0, -0.5])
    require_backend(backend, x, residual)
    with cnnkernels.use_backend(backend):
        out = ops.add_act(x, residual)
        empty = ops.add_act(torch.randn(0, 4, 2, 2), torch.randn(0, 4, 2, 2))
    assert out[0].isnan() and out[1:].tolist() == [0.0, 3.0, 0.0, 0.0]
    assert empty.shape == (0, 4, 2, 2)


def test_default_backend_on_cpu_is_cpu_when_built():
    x = residual = torch.randn(2, 4, 3, 3)
    verdict = ops.explain("add_act", x, residual)
    if _library.extension_loaded():
        assert verdict["backend"] == "cpu", verdict
    else:
        assert verdict["backend"] == "reference"
        assert "cnnkernels._C is not loaded" in " ".join(verdict["rejected"]["cpu"])
    assert "needs cuda tensors, got cpu" in verdict["rejected"]["cuda"]


def test_info_lists_add_act():
    from cnnkernels import info
    assert "add_act on cpu float32 tensors" in info.report()


# --- bad arguments ----------------------------------------------------------------------

def _good(**overrides):
    args = dict(x=torch.randn(2, 4, 3, 3), residual=torch.randn(2, 4, 3, 3), activation="relu")
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(residual=None), TypeError, "residual must be a torch.Tensor"),
    (dict(x=torch.randint(0, 5, (2, 4, 3, 3))), TypeError, "x must be a floating tensor"),
    (dict(residual=torch.randn(2, 4, 3, 3, dtype=torch.float64)), TypeError, "residual has dtype torch.float64"),
    (dict(residual=torch.randn(2, 4, 3, 4)), ValueError, r"residual must have x's shape \(2, 4, 3, 3\)"),
    (dict(residual=torch.randn(4, 3, 3)), ValueError, "residual must have x's shape"),
    (dict(x=torch.tensor(1.0), residual=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    (dict(activation="gelu"), ValueError, "activation must be one of 'relu', 'none'"),
    (dict(residual=torch.randn(2, 4, 3, 3, device="meta")), ValueError, "residual is on meta"),
])
def test_bad_argument_is_named(overrides, error, match):
    args = _good(**overrides)
    with pytest.raises(error, match=match):
        ops.add_act(args.pop("x"), args.pop("residual"), **args)


def test_activation_is_keyword_only():
    with pytest.raises(TypeError):
        ops.add_act(torch.randn(3), torch.randn(3), "none")


@pytest.mark.parametrize("first, second, activation, forward_match, backward_match", [
    (torch.randn(2, 3), torch.randn(3, 2), "relu", "residual must have the shape of x",
     "grad_out must have the shape of out"),
    (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), "relu", "residual must have the dtype of x",
     "grad_out must have the dtype of out"),
    (torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 3)), "relu", "x must be a floating-point tensor",
     "out must be a floating-point tensor"),
    (torch.randn(2, 3), torch.randn(2, 3), "tanh", 'activation must be "relu" or "none"',
     'activation must be "relu" or "none"'),
    (torch.tensor(1.0), torch.tensor(1.0), "relu", "x must have at least 1 dimension",
     "out must have at least 1 dimension"),
])
def test_native_kernel_names_the_argument(first, second, activation, forward_match, backward_match):
    """The C++ CPU kernels check their own arguments: add_act_forward(x=first,
    residual=second) and add_act_backward(grad_out=second, out=first)."""
    if not _library.has_native_kernel("_add_act_forward_native", "CPU"):
        skip_or_fail("cnnkernels._C with the add_act CPU kernels is not loaded")
    with pytest.raises(RuntimeError, match=forward_match):
        torch.ops.cnnkernels._add_act_forward_native(first, second, activation)
    with pytest.raises(RuntimeError, match=backward_match):
        torch.ops.cnnkernels._add_act_backward_native(second, first, activation)


# --- registered op: opcheck, torch.compile ----------------------------------------------

OPCHECK_CASES = [c for c in CASES if c.name in ("channels_last", "mixed_res_cl", "odd_3366", "3d")]


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck(backend, case, activation):
    x, residual = case.make(torch.float32, seed=11)
    require_backend(backend, x, residual, activation)
    x.requires_grad_(), residual.requires_grad_()
    with cnnkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.cnnkernels.add_act.default, (x, residual, activation))


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_opcheck_backward_op(backend, activation):
    x, residual = CASES[2].make(torch.float32, seed=5)
    require_backend(backend, x, residual, activation)
    with cnnkernels.use_backend(backend):
        out = torch.ops.cnnkernels.add_act(x, residual, activation)
        torch.library.opcheck(torch.ops.cnnkernels.add_act_backward.default,
                              (torch.randn_like(out), out, activation),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def block(a, b, c):
        return ops.add_act(ops.add_act(a, b), c, activation="none")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    inputs = [torch.randn(2, 4, 5, 5, requires_grad=True) for _ in range(3)]
    expected, got = block(*inputs), compiled(*inputs)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    for e, g in zip(torch.autograd.grad(expected, inputs, grad), torch.autograd.grad(got, inputs, grad)):
        assert torch.equal(g, e)
