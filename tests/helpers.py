"""Shared test helpers: relative error and the tolerances (half_precision_bound), NaN-filled
torch.empty (poisoned_empty), the conv case shapes and the conv_bn_act case list, torch's own
sequences the fused conv ops replace, and model-test helpers. The op-contract machinery
built on them is tests/op_matrix.py."""
from __future__ import annotations

import contextlib
import copy
import io
import os
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def skip_or_fail(reason: str) -> None:
    """Skips a test that needs the compiled extension, or fails it where the build is
    required to provide one (CNNKERNELS_REQUIRE_EXTENSION=1, as `make test` sets)."""
    if os.environ.get("CNNKERNELS_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"required by CNNKERNELS_REQUIRE_EXTENSION=1: {reason}")
    pytest.skip(reason)


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor), computed in float64 on the CPU."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(max(floor, 1e-30))).item()


@contextlib.contextmanager
def poisoned_empty():
    """Inside the block every torch.empty (in the kernels too) comes back NaN-filled
    (deterministic mode with fill_uninitialized_memory): unwritten output shows."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# Half precision: how close a result can get to float64 depends on the CPU (oneDNN takes
# its bf16 / fp16 paths only where the instruction set has them, and those round
# differently), so a fixed bound is not portable. A half-precision result is instead held
# to what torch itself reaches in that dtype on the same machine and inputs: no worse than
# HALF_FACTOR times the relative error of the plain-torch computation (torch's own
# conv / batch_norm / relu ... run in the half dtype) against the float64 reference, and
# never held tighter than the fixed TOLERANCE (the floor). A real bug (a dropped eps, a
# gradient off by 5 %, a wrong mask) is off by far more than twice torch's rounding.
HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_FACTOR = 2.0


def half_precision_bound(torch_err: float, dtype: torch.dtype, floor: float | None = None) -> float:
    """Bound on rel_err(ours, float64 reference) of one half-precision output or gradient:
    max(floor, HALF_FACTOR * torch_err), torch_err being rel_err(torch's own computation
    in `dtype`, the same float64 reference); floor defaults to TOLERANCE[dtype]. For
    float32 / float64 it is TOLERANCE[dtype] (or floor): those bounds do not follow torch."""
    floor = TOLERANCE[dtype] if floor is None else floor
    if dtype not in HALF_DTYPES:
        return floor
    return max(floor, HALF_FACTOR * torch_err)


def torch_conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, training,
                      momentum=0.1, eps=1e-5, residual=None, stride=1, padding=0, dilation=1, groups=1,
                      activation="relu"):
    """What ops.conv_bn_act replaces, in torch's own ops and in the inputs' dtype:
    act(batch_norm(conv2d(x)) + residual); updates running_mean / running_var in place."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = torch.nn.functional.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def torch_bn_act_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, training,
                      momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, activation="relu"):
    """What ops.bn_act_conv replaces, in torch's own ops and in the inputs' dtype:
    conv2d(act(batch_norm(x))); updates running_mean / running_var in place."""
    z = torch.nn.functional.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if activation == "relu":
        z = torch.relu(z)
    return torch.nn.functional.conv2d(z, weight, bias, stride, padding, dilation, groups)


def seeded_randn(gen: torch.Generator, *shape, scale=1.0, offset=0.0, dtype=torch.float32) -> torch.Tensor:
    """Normal random values drawn in float64 from gen, times scale plus offset, cast to dtype."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


@dataclass(frozen=True)
class ShapeCase:
    """A named configuration of an op over one x of `shape`, ending in `activation`."""
    name: str
    shape: tuple
    activation: str = "none"


@dataclass(frozen=True)
class ConvShape:
    """A named convolution configuration: x [n, c_in, hw, hw], weight [c_out, c_in / groups,
    kernel, kernel]; the base of the conv_bn_act and bn_act_conv cases."""
    name: str
    n: int = 2
    c_in: int = 8
    c_out: int = 16
    hw: int = 8
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1

    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    def conv_weight(self, gen, dtype) -> torch.Tensor:
        """A random weight of fan-in-normalised scale."""
        fan_in = self.c_in // self.groups * self.kernel ** 2
        return seeded_randn(gen, self.c_out, self.c_in // self.groups, self.kernel, self.kernel,
                            scale=fan_in ** -0.5, dtype=dtype)

    def schema_conv(self):
        """stride, padding, dilation, groups as the schemas take them."""
        return [self.stride] * 2, [self.padding] * 2, [self.dilation] * 2, self.groups


@dataclass(frozen=True)
class ConvCase(ConvShape):
    """One conv_bn_act configuration."""
    channels_last: bool = False
    residual: bool = False
    activation: str = "relu"
    bias: bool = False
    extra: dict = field(default_factory=dict)

    def make(self, dtype=torch.float32, device="cpu", requires_grad=True, seed=0):
        """Fresh random inputs: x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual."""
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0, offset=0.0):
            return seeded_randn(gen, *shape, scale=scale, offset=offset, dtype=dtype).to(device)

        x = rand(self.n, self.c_in, self.hw, self.hw)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = self.conv_weight(gen, dtype).to(device)
        bias = rand(self.c_out, scale=0.1) if self.bias else None
        bn_weight = rand(self.c_out, scale=0.3, offset=1.0)
        bn_bias = rand(self.c_out, scale=0.3)
        running_mean = rand(self.c_out, scale=0.2)
        running_var = (seeded_randn(gen, self.c_out, scale=0.3, dtype=torch.float64).abs() + 0.5).to(dtype).to(device)
        residual = rand(self.n, self.c_out, self.out_hw(), self.out_hw()) if self.residual else None
        tensors = [x, weight, bias, bn_weight, bn_bias]
        if requires_grad:
            for t in tensors + [residual]:
                if t is not None:
                    t.requires_grad_(True)
        return x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, activation=self.activation)


CASES = [
    ConvCase("1x1", kernel=1, padding=0, residual=True),
    ConvCase("3x3"),
    ConvCase("stem7x7s2", c_in=3, c_out=8, hw=12, kernel=7, stride=2, padding=3),
    ConvCase("3x3s2", stride=2, bias=True),
    ConvCase("dilation2", padding=2, dilation=2, activation="none"),
    ConvCase("groups2", groups=2, residual=True),
    ConvCase("groups32", c_in=64, c_out=64, hw=4, groups=32),
    ConvCase("depthwise", c_in=16, c_out=16, groups=16),
    ConvCase("channels_last", channels_last=True, residual=True),
    ConvCase("batch1", n=1, hw=6),
    ConvCase("odd_channels", c_in=3, c_out=5, hw=7, bias=True, residual=True, activation="none"),
    ConvCase("1x1s2_channels_last", kernel=1, padding=0, stride=2, channels_last=True),
]


def randomize_batchnorm(model: "torch.nn.Module", seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (fresh ones are 1, 0,
    0, 1, which would hide a normalisation mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                m.bias.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))


def load_twin_state(ours: "torch.nn.Module", theirs: "torch.nn.Module") -> None:
    """theirs gets non-trivial BatchNorm state (randomize_batchnorm) and ours loads its
    state_dict strictly: the same keys in the same order, as many parameters."""
    randomize_batchnorm(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def train_forward_alike(ours, theirs, x: torch.Tensor, dtype=torch.float64):
    """ours and theirs in `dtype` and train mode, each on its own copy of x (requiring
    grad), both run after torch.manual_seed(1) (the same dropout masks):
    (out, ref, x_ours, x_theirs)."""
    ours.to(dtype).train(), theirs.to(dtype).train()
    x_ours, x_theirs = (x.detach().to(dtype).clone().requires_grad_() for _ in range(2))
    torch.manual_seed(1)
    ref = theirs(x_theirs)
    torch.manual_seed(1)
    out = ours(x_ours)
    return out, ref, x_ours, x_theirs


def assert_same_gradients(ours, theirs, out, ref, inputs, tol: float, grad_out=None) -> None:
    """Backpropagates one grad_out (random of ref's shape unless given) through our out and
    their ref; the gradients of every (our input, their input) pair of `inputs` and of
    every parameter, in order, agree within tol."""
    grad_out = torch.randn_like(ref) if grad_out is None else grad_out
    out.backward(grad_out)
    ref.backward(grad_out)
    for i, (a, b) in enumerate(inputs):
        assert rel_err(a.grad, b.grad) < tol, f"input {i}"
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < tol, name


def check_train_steps(fused, twin, make_input, steps: int = 3, out_tol: float = 1e-5, grad_tol: float = 1e-4):
    """`steps` train-mode steps of a fused module and its unfused twin (same state_dict) on
    make_input() each: outputs within out_tol, parameter gradients within grad_tol; then
    the whole state (running statistics) alike."""
    for step in range(steps):
        x = make_input()
        out, ref = fused(x), twin(x)
        assert rel_err(out, ref) < out_tol, step
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, list(fused.parameters()), grad)
        want = torch.autograd.grad(ref, list(twin.parameters()), grad)
        for g, w in zip(got, want, strict=True):
            assert rel_err(g, w) < grad_tol, step
    for key, value in twin.state_dict().items():
        assert torch.allclose(fused.state_dict()[key].float(), value.float(), rtol=1e-5, atol=1e-6), key


class Formula(torch.nn.Module):
    """A copy of `module` (same parameter order) run through a plain-torch formula(module, x)."""

    def __init__(self, module, formula):
        super().__init__()
        self.inner, self.formula = copy.deepcopy(module), formula

    def forward(self, x):
        return self.formula(self.inner, x)


class RecordOps(TorchDispatchMode):
    """Counts every op reaching the dispatcher (per overload) and records the weight of
    each fused bn_act_conv call (out-of-place form)."""

    def __init__(self):
        super().__init__()
        self.counts, self.bn_act_conv_weights = {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        if func is torch.ops.cnnkernels.bn_act_conv.default:
            self.bn_act_conv_weights.append(args[1].data_ptr())
        return func(*args, **(kwargs or {}))


def global_state() -> dict:
    """The process-wide settings a test could change and forget to restore (tests/conftest.py
    checks them around every test)."""
    from cnnkernels import _backends
    return {
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
        "cudnn flags": (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
                        torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled),
        "matmul TF32": (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()),
        "forced backend": (_backends.forced_backend(), os.environ.get("CNNKERNELS_BACKEND")),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")),
    }


def copies(module: "torch.nn.Module") -> tuple:
    """(a deep copy of module, module through torch.save and torch.load)."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return copy.deepcopy(module), torch.load(buffer, weights_only=False)
