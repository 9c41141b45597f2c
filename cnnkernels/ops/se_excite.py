"""cnnkernels.ops.se_excite: the Squeeze-and-Excitation gate (+ residual + activation), fused.

The registered ops (schemas in cnnkernels/schemas.def):
  cnnkernels::se_excite           forward, returns (out, squeezed, hidden, gate)
  cnnkernels::se_excite_backward  the six gradients
Both get their CPU and CUDA kernels here; each kernel picks a backend per call
(cnnkernels/_backends.py). The forward keeps the per-sample squeeze (mean of x), the
hidden activations and the gate, so the backward never reduces x twice for them.
Fake implementations and autograd are registered here too, so torch.compile traces the
op without a graph break.
"""
from __future__ import annotations

from math import prod

import torch

from cnnkernels import _cost, reference
from cnnkernels.ops import _autocast, _checks, _registration

OP = "se_excite"
BACKWARD_OP = "se_excite_backward"
_FORWARD_ARGS = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual", "activation")
_GRAD_INPUT_INDEX = (0, 1, 2, 3, 4, 5)  # every tensor argument, in schema order


def se_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, residual=None, activation="none"):
    """act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + residual) in one fused op.

    Shapes: x [N, C, H, W]; fc1_weight [R, C] or [R, C, 1, 1] (a 1x1 convolution's
    weight), fc1_bias [R] or None; fc2_weight [C, R] or [C, R, 1, 1], fc2_bias [C] or
    None; residual [N, C, H, W] or None. The weights and biases have x's dtype and
    device. Returns [N, C, H, W] in x's dtype and memory format (channels_last in,
    channels_last out).

    Semantics are exactly those of
    ``s = x.mean((2, 3)); h = relu(F.linear(s, fc1_weight, fc1_bias));
    gate = sigmoid(F.linear(h, fc2_weight, fc2_bias));
    act(x * gate[:, :, None, None] + residual)`` with activation "relu" or "none",
    computed in float32 (float64 for float64 x). Gradients flow to x, the four fc
    parameters and residual. Which backend runs is explained by
    ``cnnkernels.ops.explain("se_excite", x, fc1_weight, ...)``.
    """
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = _autocast.cast(
        _autocast.lower_precision(x), x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    args = _normalize(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation)
    return torch.ops.cnnkernels.se_excite(*args)[0]


def _fc_weight(t, name: str, rows: int | None, cols: int | None, x):
    """A [rows, cols] or [rows, cols, 1, 1] weight, returned as the [rows, cols] view."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4:
        if tuple(t.shape[2:]) != (1, 1):
            raise ValueError(f"{name} must be [out, in] or [out, in, 1, 1], got shape {tuple(t.shape)}")
        t = t.flatten(1)
    _checks.check_tensor(t, name, ndim=2)
    _checks.check_like(t, name, x)
    expected = (rows if rows is not None else t.shape[0], cols if cols is not None else t.shape[1])
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (or with trailing 1, 1), got {tuple(t.shape)}")
    return t


def _normalize(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation) -> tuple:
    """Checks every argument and returns them in the schema's order and types."""
    _checks.check_activation(activation, reference.ACTIVATIONS)
    _checks.check_tensor(x, "x", ndim=4)
    n, c, h, w = x.shape
    if c < 1 or h * w < 1:
        raise ValueError(f"x must have at least one channel and one pixel, got shape {tuple(x.shape)}")
    fc1_weight = _fc_weight(fc1_weight, "fc1_weight", None, c, x)
    r = fc1_weight.shape[0]
    if r < 1:
        raise ValueError(f"fc1_weight must have at least one output row, got shape {tuple(fc1_weight.shape)}")
    fc2_weight = _fc_weight(fc2_weight, "fc2_weight", c, r, x)
    for name, bias, size in (("fc1_bias", fc1_bias, r), ("fc2_bias", fc2_bias, c)):
        if bias is None:
            continue
        _checks.check_tensor(bias, name, ndim=1)
        _checks.check_like(bias, name, x)
        if bias.numel() != size:
            raise ValueError(f"{name} must have {size} elements, got {bias.numel()}")
    if residual is not None:
        _checks.check_tensor(residual, "residual", ndim=4)
        _checks.check_like(residual, "residual", x)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation)


def _normalize_call(*args, **kwargs) -> tuple:
    """The schema's arguments for a call written like se_excite(*args, **kwargs)."""
    return _normalize(*_registration.bind(se_excite, args, kwargs, drop=()))


def _sample(device):
    weights = (torch.randn(2, 8, device=device), torch.zeros(2, device=device), torch.randn(8, 2, device=device),
               torch.zeros(8, device=device))
    return (torch.randn(2, 8, 8, 8, device=device), *weights), {}


def _analysis_cost(v: dict, result) -> _cost.OpCost:
    """One call as cnnkernels.analysis counts it (module docstring there)."""
    nbytes = _cost.nbytes
    x, (out, squeezed, hidden, gate) = v["x"], result
    residual, activation = v["residual"], v["activation"]
    weights = [v[k] for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    # unfused: pool x -> s; fc1 -> h; relu; fc2 -> g; sigmoid; x * g; (+ residual); (act)
    unfused = (nbytes(x, squeezed) + nbytes(squeezed, weights[0], weights[1], hidden) + 2 * nbytes(hidden)
               + nbytes(hidden, weights[2], weights[3], gate) + 2 * nbytes(gate) + nbytes(x, gate, out)
               + _cost.epilogue_bytes(out, residual, activation))
    return _cost.OpCost(_cost.steps(["se"], residual is not None, activation), x,
                        [residual] if residual is not None else [], weights, out,
                        x.numel() + 2 * weights[0].numel() * x.shape[0] + out.numel(), unfused)


def _traffic(shape, hidden_channels, *, residual=True, activation="relu", mode="eval",
             itemsize=4) -> _cost.Traffic:
    """Memory traffic (cnnkernels.bench.traffic) of act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) +
    residual): x [N, C, H, W], fc1 [R, C], fc2 [C, R] with R = hidden_channels."""
    train, relu = _cost.check_mode(mode), _cost.check_activation(activation)
    a = prod(shape) * itemsize
    fc = shape[1] * hidden_channels * itemsize
    sizes = {name: a for name in ("x", "scaled", "sum", "out", "residual", "grad_out", "grad_sum", "grad_x_gate",
                                  "grad_gate_product", "grad_x_mean", "grad_x", "grad_residual")}
    sizes.update({name: fc for name in ("fc1_weight", "fc2_weight", "grad_fc1_weight", "grad_fc2_weight")})
    res = "residual" if residual else None
    unfused, fused = _cost.Passes(sizes), _cost.Passes(sizes)
    unfused.add("mean over H, W", ("x",))
    unfused.add("fc1, relu, fc2, sigmoid", ("fc1_weight", "fc2_weight"))
    unfused.add("mul by gate", ("x",), ("scaled",))
    unfused.add("add", ("scaled", res), ("sum",), when=residual)
    unfused.add("relu", ("sum" if residual else "scaled",), ("out",), when=relu)
    fused.add("squeeze", ("x",))
    fused.add("fc1, relu, fc2, sigmoid", ("fc1_weight", "fc2_weight"))
    fused.add("scale + residual + act", ("x", res), ("out",))
    if train:
        grad = "grad_sum" if relu else "grad_out"
        unfused.add("relu backward", ("grad_out", "out"), ("grad_sum",), when=relu)
        unfused.add("mul backward to x", (grad,), ("grad_x_gate",))
        unfused.add("mul backward to gate", (grad, "x"), ("grad_gate_product",))
        unfused.add("sum over H, W", ("grad_gate_product",))
        unfused.add("fc backward", ("fc1_weight", "fc2_weight"), ("grad_fc1_weight", "grad_fc2_weight"))
        unfused.add("mean backward", (), ("grad_x_mean",))
        unfused.add("accumulate grad x", ("grad_x_gate", "grad_x_mean"), ("grad_x",))
        mask = "out" if relu else None
        fused.add("backward reduce sum_hw(g * x)", ("grad_out", mask, "x"))
        fused.add("fc backward", ("fc1_weight", "fc2_weight"), ("grad_fc1_weight", "grad_fc2_weight"))
        fused.add("backward elementwise", ("grad_out", mask), ("grad_x", "grad_residual" if residual else None))
    return _cost.Traffic("se_excite", mode, tuple(unfused.passes), tuple(fused.passes))


_registration.declare_call(OP, _normalize_call, _sample, cost=_analysis_cost, traffic=_traffic)


# --- backends and dispatcher registrations ---------------------------------------------

_TRITON = _registration.TritonModule("cnnkernels.triton.se_excite")


_registration.register(
    OP, family=OP,
    reference=("plain torch: mean, linear, sigmoid, scale, activation", reference.se_excite_forward),
    native=({"cpu": "per-sample squeeze + FC + gate (parallel over samples), one fused scale/residual/activation "
                    "pass",
             "cuda": "one block per sample for squeeze + FC + gate (shared-memory reductions), one elementwise "
                     "scale/residual/activation kernel"}, "_se_excite_forward_native"),
    triton=("Triton squeeze, fc1, fc2+sigmoid and fused scale/residual/activation kernels",
            _TRITON.function("forward"), _TRITON.reasons))
_registration.register(
    BACKWARD_OP, family=OP, x_index=2,
    reference=("plain torch", reference.se_excite_backward),
    native=({"cpu": "per-sample reduction of g*x + FC backward, one fused grad_x/grad_residual pass, weight grads "
                    "by GEMM",
             "cuda": "one block per sample for the g*x reduction and FC backward, weight-gradient kernel, one "
                     "elementwise grad_x/grad_residual kernel"}, "_se_excite_backward_native"),
    triton=("Triton g*x reduction, FC backward, weight-gradient and fused grad_x/grad_residual kernels",
            _TRITON.function("backward"), _TRITON.reasons_from("backward_unsupported_reasons")))


@torch.library.register_fake(f"cnnkernels::{OP}")
def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, activation):
    fmt = reference.output_memory_format(x)
    sdtype = reference.stats_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    r = fc1_weight.shape[0]
    out = torch.empty_like(x, memory_format=fmt)
    return (out, x.new_empty((n, c), dtype=sdtype), x.new_empty((n, r), dtype=sdtype),
            x.new_empty((n, c), dtype=sdtype))


@torch.library.register_fake(f"cnnkernels::{BACKWARD_OP}")
def _backward_fake(grad_out, out, x, fc1_weight, fc2_weight, squeezed, hidden, gate, activation, output_mask):
    fmt = reference.output_memory_format(x)
    r, c = fc1_weight.shape
    wanted = (
        (lambda: torch.empty_like(x, memory_format=fmt)),
        (lambda: x.new_empty((r, c))),
        (lambda: x.new_empty(r)),
        (lambda: x.new_empty((c, r))),
        (lambda: x.new_empty(c)),
        (lambda: torch.empty_like(x, memory_format=fmt)),
    )
    return tuple(make() if want else x.new_empty(0) for make, want in zip(wanted, output_mask))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the unused outputs' gradients
    x, fc1_weight, _, fc2_weight, _, _, activation = inputs
    out, squeezed, hidden, gate = output
    ctx.save_for_backward(out, x, fc1_weight, fc2_weight, squeezed, hidden, gate)
    ctx.activation = activation
    ctx.mark_non_differentiable(squeezed, hidden, gate)


def _backward(ctx, grad_out, _grad_squeezed, _grad_hidden, _grad_gate):
    out, x, fc1_weight, fc2_weight, squeezed, hidden, gate = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[i]) for i in _GRAD_INPUT_INDEX]
    grads = [None] * len(_FORWARD_ARGS)
    if grad_out is None or not any(mask):
        return tuple(grads)
    results = torch.ops.cnnkernels.se_excite_backward(
        grad_out, out, x, fc1_weight, fc2_weight, squeezed, hidden, gate, ctx.activation, mask)
    for index, wanted, grad in zip(_GRAD_INPUT_INDEX, mask, results):
        if wanted:
            grads[index] = grad
    return tuple(grads)


torch.library.register_autograd(f"cnnkernels::{OP}", _backward, setup_context=_setup_context)
