"""cnnkernels.ops.add_act: residual add + activation, fused.

The registered ops (schemas in cnnkernels/schemas.def):
  cnnkernels::add_act           forward, returns out = act(x + residual)
  cnnkernels::add_act_backward  grad = grad_out * (out > 0) (relu) / grad_out (none)
Both get their CPU and CUDA kernels here; each kernel picks a backend per call
(cnnkernels/_backends.py). Fake implementations and autograd are registered here too,
so torch.compile(fullgraph=True) traces the op without a graph break.
"""
from __future__ import annotations

from math import prod

import torch

from cnnkernels import _cost, reference
from cnnkernels.ops import _autocast, _checks, _registration

OP = "add_act"
BACKWARD_OP = "add_act_backward"


def add_act(x, residual, *, activation="relu"):
    """act(x + residual) in one pass, as at the end of a ResNet block.

    Shapes: x and residual have one shape (typically [N, C, H, W]; any ndim >= 1 is
    accepted), one floating dtype (float32, float64, float16, bfloat16) and one device;
    their strides may differ. Returns a new tensor of that shape and dtype in x's
    memory format: channels_last when a 4-D x is channels-last (and not contiguous),
    contiguous otherwise (a residual in another layout is read through a copy).

    activation is "relu" or "none". The sum is formed in float32 (float64 for float64)
    and rounded once. Gradients flow to x and residual: both get
    grad_out * (out > 0) for relu, grad_out for none. Which backend runs is explained by
    ``cnnkernels.ops.explain("add_act", x, residual)``.
    """
    x, residual = _autocast.promote(x, residual)
    return torch.ops.cnnkernels.add_act(*_normalize(x, residual, activation))


def _normalize(x, residual, activation) -> tuple:
    """Checks every argument and returns them in the schema's order and types."""
    _checks.check_activation(activation, reference.ACTIVATIONS)
    _checks.check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-D tensor")
    _checks.check_tensor(residual, "residual")
    _checks.check_like(residual, "residual", x)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return (x, residual, activation)


def _normalize_call(*args, **kwargs) -> tuple:
    """The schema's arguments for a call written like add_act(*args, **kwargs)."""
    return _normalize(*_registration.bind(add_act, args, kwargs, drop=()))


def _sample(device):
    return (torch.randn(2, 8, 8, 8, device=device), torch.randn(2, 8, 8, 8, device=device)), {}


def _analysis_cost(v: dict, out) -> _cost.OpCost:
    """One call as cnnkernels.analysis counts it (module docstring there)."""
    x, residual, activation = v["x"], v["residual"], v["activation"]
    unfused = _cost.nbytes(x, residual, out) + (2 * _cost.nbytes(out) if activation != "none" else 0)
    return _cost.OpCost(_cost.steps(["add"], False, activation), x, [residual], [], out, 0, unfused)


def _traffic(shape, *, activation="relu", mode="eval", itemsize=4) -> _cost.Traffic:
    """Memory traffic (cnnkernels.bench.traffic) of act(x + residual): x and residual of one shape."""
    train, relu = _cost.check_mode(mode), _cost.check_activation(activation)
    a = prod(shape) * itemsize
    sizes = {name: a for name in ("x", "residual", "sum", "out", "grad_out", "grad_sum")}
    unfused, fused = _cost.Passes(sizes), _cost.Passes(sizes)
    unfused.add("add", ("x", "residual"), ("sum",))
    unfused.add("relu", ("sum",), ("out",), when=relu)
    fused.add("add_act", ("x", "residual"), ("out",))
    if train:
        unfused.add("relu backward", ("grad_out", "out"), ("grad_sum",), when=relu)
        fused.add("add_act backward", ("grad_out", "out"), ("grad_sum",), when=relu)
    return _cost.Traffic("add_act", mode, tuple(unfused.passes), tuple(fused.passes))


_registration.declare_call(OP, _normalize_call, _sample, cost=_analysis_cost, traffic=_traffic)


# --- backends and dispatcher registrations ---------------------------------------------

_TRITON = _registration.TritonModule("cnnkernels.triton.add_act")

_registration.register(
    OP, family=OP,
    reference=("plain torch: add, relu", reference.add_act_forward),
    native=("one fused elementwise pass over x and residual in the output's memory format",
            "_add_act_forward_native"),
    triton=("flat elementwise Triton kernel over dense tensors in the output's memory format",
            _TRITON.function("forward"), _TRITON.reasons))
_registration.register(
    BACKWARD_OP, family=OP,
    reference=("plain torch: where(out > 0)", reference.add_act_backward),
    native=("one elementwise pass: grad_out masked by out > 0", "_add_act_backward_native"),
    triton=("flat elementwise Triton kernel: grad_out masked by out > 0", _TRITON.function("backward"),
            _TRITON.reasons))


@torch.library.register_fake(f"cnnkernels::{OP}")
def _forward_fake(x, residual, activation):
    return torch.empty_like(x, memory_format=reference.output_memory_format(x))


@torch.library.register_fake(f"cnnkernels::{BACKWARD_OP}")
def _backward_fake(grad_out, out, activation):
    return torch.empty_like(out, memory_format=reference.output_memory_format(out))


def _setup_context(ctx, inputs, output):
    ctx.activation = inputs[2]
    ctx.save_for_backward(output if ctx.activation == "relu" else None)


def _backward(ctx, grad_out):
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None
    if ctx.activation == "relu":
        (out,) = ctx.saved_tensors
        grad = torch.ops.cnnkernels.add_act_backward(grad_out, out, ctx.activation)
    else:
        grad = grad_out  # the identity: no kernel, no copy (as aten's add backward)
    return (grad if ctx.needs_input_grad[0] else None, grad if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd(f"cnnkernels::{OP}", _backward, setup_context=_setup_context)
