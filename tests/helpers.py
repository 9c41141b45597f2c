"""Shared test helpers: relative error, the conv_bn_act case list, NaN-filled torch.empty,
and pieces the conv_bn_act and bn_act_conv op tests share."""
from __future__ import annotations

import contextlib
import copy
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


def half_precision_bounds(dtype: torch.dtype, torch_results: dict, ref_results: dict,
                          floor: float | None = None) -> dict:
    """{name: half_precision_bound(rel_err(torch_results[name], ref_results[name]), dtype, floor)}
    for every name of ref_results (outputs, gradients, running statistics alike)."""
    return {name: half_precision_bound(rel_err(torch_results[name], ref), dtype, floor)
            for name, ref in ref_results.items()}


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


class Formula(torch.nn.Module):
    """A copy of `module` (same parameter order) run through a plain-torch formula(module, x)."""

    def __init__(self, module, formula):
        super().__init__()
        self.inner, self.formula = copy.deepcopy(module), formula

    def forward(self, x):
        return self.formula(self.inner, x)


def conv_op_arguments(bn_channels: int, **overrides) -> dict:
    """Valid arguments of ops.conv_bn_act / ops.bn_act_conv (x [2, 8, 6, 6], weight
    [16, 8, 3, 3], padding 1, BN parameters and running statistics of bn_channels), with
    `overrides` replacing or adding some."""
    args = dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(16, 8, 3, 3), bn_weight=torch.ones(bn_channels),
                bn_bias=torch.zeros(bn_channels), running_mean=torch.zeros(bn_channels),
                running_var=torch.ones(bn_channels), padding=1)
    args.update(overrides)
    return args


def call_conv_op(op, bn_channels: int, **overrides):
    """op(x, weight, **rest) on conv_op_arguments(bn_channels, **overrides)."""
    args = conv_op_arguments(bn_channels, **overrides)
    return op(args.pop("x"), args.pop("weight"), **args)


# (overrides of conv_op_arguments, error, match) that conv_bn_act and bn_act_conv reject alike.
CONV_ARGUMENT_ERRORS = [
    (dict(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
    (dict(weight=torch.randn(16, 8, 3)), ValueError, "weight must be 4-D"),
    (dict(x=torch.randint(0, 5, (2, 8, 6, 6))), TypeError, "x must be a floating tensor"),
    (dict(weight=torch.randn(16, 8, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (dict(weight=torch.randn(16, 4, 3, 3)), ValueError, "x has 8 channels but weight expects 4"),
    (dict(weight=torch.randn(16, 3, 3, 3), groups=3), ValueError, "groups=3 must divide"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(groups=True), ValueError, "groups must be a positive int"),
    (dict(eps=-1e-5), ValueError, "eps must be a number >= 0"),
    (dict(momentum=None, training=True), TypeError, "momentum must be a float"),
    (dict(bias=torch.zeros(15)), ValueError, "bias must have 16 elements"),
    (dict(activation="gelu"), ValueError, "activation must be one of 'relu', 'none'"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (dict(dilation=-1), ValueError, "dilation must be >= 1"),
    (dict(running_mean=None), ValueError, "running_mean and running_var must be given together"),
    (dict(running_mean=None, running_var=None), ValueError, "required when training=False"),
    (dict(padding=0, x=torch.randn(2, 8, 2, 2)), ValueError, "does not fit"),
    (dict(x=torch.randn(1, 8, 1, 1), weight=torch.randn(16, 8, 1, 1), padding=0, training=True),
     ValueError, "more than 1 value per channel"),
]


def check_compile_matches_eager(make_model, training: bool, x_shape: tuple) -> None:
    """torch.compile(fullgraph=True, backend="aot_eager") of make_model() against a copy run
    eagerly: output, gradients of x and of every parameter, and the updated state (running
    statistics), in train or eval mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled_model = make_model(), make_model()
    compiled_model.load_state_dict(eager.state_dict())
    eager.train(training), compiled_model.train(training)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(*x_shape, requires_grad=True)
    expected, got = eager(x), compiled(x)
    assert rel_err(got, expected) < 1e-6
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x] + list(eager.parameters()), grad)
    got_grads = torch.autograd.grad(got, [x] + list(compiled_model.parameters()), grad)
    for e, g in zip(expected_grads, got_grads):
        assert rel_err(g, e) < 1e-5
    for key, value in eager.state_dict().items():  # running statistics were updated alike
        assert torch.allclose(compiled_model.state_dict()[key].float(), value.float(), atol=1e-6), key


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
