"""Memory traffic of each fused op against the unfused torch sequence it replaces:
bytes read + bytes written, counted from the shapes.

Counting rules
--------------
- A computation is a list of passes (kernels). A pass reads every tensor it takes once
  and writes every tensor it makes once, all from and to memory: nothing stays in cache
  between passes, and the re-reads inside one kernel (convolution tiles, im2col) are
  not counted. A convolution is one pass reading x and the weight and writing its
  output; its backward is two passes (grad of the input: grad_out and weight in; grad
  of the weight: grad_out and x in).
- Counted tensors: activations (anything with the N x H x W extent: inputs, outputs,
  temporaries, gradients) and weights (convolution and FC weights and their
  gradients). Per-channel and per-sample vectors (BN parameters and statistics, biases,
  SE's squeezed / hidden / gate [N, C]) are left out: each is at most 1 / (H * W) of one
  activation pass (2 % at 7 x 7, 0.03 % at 56 x 56), and the arithmetic on them is
  not a pass over memory either.
- Every tensor is counted at `itemsize` bytes per element (the benchmark's dtype).
- "eval" is the forward pass with running statistics. "train" is the training
  forward plus the backward, with a dense grad_out of the output's size as in a
  network (not the zero-stride one of out.sum().backward()); gradients flow to every
  activation input (except a conv_bn_act input given input_grad=False, such as the
  image at the stem) and every weight. Autograd's pass-through backward of an add (the
  same gradient tensor for both inputs) costs nothing.
- Unfused: the eager torch sequence, one pass per op, as torch's CPU and CUDA kernels
  run them: BatchNorm in training is a statistics pass and a normalise pass, its
  backward a reduction pass and an elementwise pass; mean's backward materialises
  grad / (H * W); a broadcast multiply's backward to the small operand writes the full
  product and then sums it.
- Fused: the passes of the cnnkernels op as designed:
  conv_bn_act eval: the BN scale folded into the weight (a pass over the weight), then
  one convolution with shift, residual and activation in its epilogue (the cpu
  backend's oneDNN path in float32). Training: convolution, statistics pass,
  normalise + residual + activation pass; backward: a reduction pass and an
  elementwise pass (both read grad_out, out for the ReLU mask, and the saved conv
  output), then the convolution backward (csrc/common/conv_bn_act_driver.h).
  add_act: one pass each way. se_excite: squeeze pass + scale pass; backward: reduction
  pass + elementwise pass (csrc/cpu/se_excite.cpp).
  bn_act_conv: BN + activation applied while loading x into the convolution, so the
  normalised input is never written; training adds a statistics pass, and the
  backward recomputes act(bn(x)) from x in the weight-gradient convolution and runs a
  reduction and an elementwise pass for BN (the contract of issue 3). A backend that
  normalises into a temporary (the cpu backend may) adds one write and one read of
  x's size per normalisation.

Each op's function returns a Traffic with both pass lists, so that every figure can
be traced to the passes that make it up (Traffic.describe()).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

MODES = ("eval", "train")


@dataclass(frozen=True)
class Pass:
    """One kernel: the tensors it reads and writes, each as (name, bytes)."""
    name: str
    reads: tuple[tuple[str, int], ...]
    writes: tuple[tuple[str, int], ...]

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.reads) + sum(size for _, size in self.writes)

    def describe(self) -> str:
        def names(items):
            return ", ".join(name for name, _ in items) or "-"
        return f"{self.name}: {names(self.reads)} -> {names(self.writes)}"


@dataclass(frozen=True)
class Traffic:
    """Bytes read + written by the unfused sequence and by the fused op."""
    op: str
    mode: str
    unfused: tuple[Pass, ...]
    fused: tuple[Pass, ...]

    @property
    def unfused_bytes(self) -> int:
        return sum(p.bytes for p in self.unfused)

    @property
    def fused_bytes(self) -> int:
        return sum(p.bytes for p in self.fused)

    @property
    def saved_bytes(self) -> int:
        return self.unfused_bytes - self.fused_bytes

    @property
    def saved_fraction(self) -> float:
        return self.saved_bytes / self.unfused_bytes

    def describe(self) -> str:
        """The two pass lists, one pass a line."""
        lines = [f"{self.op} {self.mode}: unfused {self.unfused_bytes} B"]
        lines += [f"  {p.describe()}" for p in self.unfused]
        lines.append(f"fused {self.fused_bytes} B")
        lines += [f"  {p.describe()}" for p in self.fused]
        return "\n".join(lines)

    def extra_info(self) -> dict:
        """The figures for pytest-benchmark's extra_info."""
        return {"traffic_unfused_bytes": self.unfused_bytes, "traffic_fused_bytes": self.fused_bytes,
                "traffic_saved_bytes": self.saved_bytes,
                "traffic_saved_pct": round(100 * self.saved_fraction, 1),
                "traffic_unfused_passes": [p.describe() for p in self.unfused],
                "traffic_fused_passes": [p.describe() for p in self.fused]}


class _Passes:
    """Builds passes from tensor names; sizes maps each name to its bytes."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.passes: list[Pass] = []

    def add(self, name: str, reads, writes=(), when: bool = True) -> None:
        if when:
            self.passes.append(Pass(name, tuple((t, self.sizes[t]) for t in reads if t),
                                    tuple((t, self.sizes[t]) for t in writes if t)))


def _check_mode(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode == "train"


def _check_activation(activation: str) -> bool:
    if activation not in ("relu", "none"):
        raise ValueError(f"activation must be 'relu' or 'none', got {activation!r}")
    return activation == "relu"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_shape(x_shape, weight_shape, stride=1, padding=0, dilation=1) -> tuple[int, int, int, int]:
    """[N, C_out, H_out, W_out] of conv2d(x [N, C_in, H, W], weight [C_out, C_in/g, kH, kW])."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, _, h, w = x_shape
    kh, kw = weight_shape[2:]
    return (n, weight_shape[0], (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def conv_bn_act(x_shape, weight_shape, *, stride=1, padding=0, dilation=1, residual=False,
                activation="relu", mode="eval", input_grad=True, itemsize=4) -> Traffic:
    """act(bn(conv2d(x, weight)) + residual): x [N, C_in, H, W], weight [C_out, C_in/g, kH, kW]."""
    train, relu = _check_mode(mode), _check_activation(activation)
    x = prod(x_shape) * itemsize
    w = prod(weight_shape) * itemsize
    y = prod(conv_output_shape(x_shape, weight_shape, stride, padding, dilation)) * itemsize
    res = "residual" if residual else None
    sizes = {"x": x, "weight": w, "folded_weight": w, "grad_x": x, "grad_weight": w}
    sizes.update({name: y for name in ("conv_out", "bn_out", "sum", "out", "residual", "grad_out", "grad_sum",
                                       "grad_conv_out", "grad_residual")})
    unfused, fused = _Passes(sizes), _Passes(sizes)
    unfused.add("conv2d", ("x", "weight"), ("conv_out",))
    if train:
        unfused.add("batch_norm statistics", ("conv_out",))
    unfused.add("batch_norm", ("conv_out",), ("bn_out",))
    unfused.add("add", ("bn_out", res), ("sum",), when=residual)
    unfused.add("relu", ("sum" if residual else "bn_out",), ("out",), when=relu)
    if train:
        grad_bn = "grad_sum" if relu else "grad_out"
        unfused.add("relu backward", ("grad_out", "out"), ("grad_sum",), when=relu)
        unfused.add("batch_norm backward reduce", (grad_bn, "conv_out"))
        unfused.add("batch_norm backward", (grad_bn, "conv_out"), ("grad_conv_out",))
        unfused.add("conv2d backward input", ("grad_conv_out", "weight"), ("grad_x",), when=input_grad)
        unfused.add("conv2d backward weight", ("grad_conv_out", "x"), ("grad_weight",))

        fused.add("conv2d", ("x", "weight"), ("conv_out",))
        fused.add("batch statistics", ("conv_out",))
        fused.add("normalize + residual + act", ("conv_out", res), ("out",))
        mask = "out" if relu else None
        fused.add("backward reduce", ("grad_out", mask, "conv_out"))
        fused.add("backward elementwise", ("grad_out", mask, "conv_out"),
                  ("grad_conv_out", "grad_residual" if residual else None))
        fused.add("conv2d backward input", ("grad_conv_out", "weight"), ("grad_x",), when=input_grad)
        fused.add("conv2d backward weight", ("grad_conv_out", "x"), ("grad_weight",))
    else:
        fused.add("fold BN scale into weight", ("weight",), ("folded_weight",))
        fused.add("conv2d + shift + residual + act epilogue", ("x", "folded_weight", res), ("out",))
    return Traffic("conv_bn_act", mode, tuple(unfused.passes), tuple(fused.passes))


def add_act(shape, *, activation="relu", mode="eval", itemsize=4) -> Traffic:
    """act(x + residual): x and residual of one shape."""
    train, relu = _check_mode(mode), _check_activation(activation)
    a = prod(shape) * itemsize
    sizes = {name: a for name in ("x", "residual", "sum", "out", "grad_out", "grad_sum")}
    unfused, fused = _Passes(sizes), _Passes(sizes)
    unfused.add("add", ("x", "residual"), ("sum",))
    unfused.add("relu", ("sum",), ("out",), when=relu)
    fused.add("add_act", ("x", "residual"), ("out",))
    if train:
        unfused.add("relu backward", ("grad_out", "out"), ("grad_sum",), when=relu)
        fused.add("add_act backward", ("grad_out", "out"), ("grad_sum",), when=relu)
    return Traffic("add_act", mode, tuple(unfused.passes), tuple(fused.passes))


def se_excite(shape, hidden_channels, *, residual=True, activation="relu", mode="eval", itemsize=4) -> Traffic:
    """act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + residual): x [N, C, H, W], fc1 [R, C],
    fc2 [C, R] with R = hidden_channels."""
    train, relu = _check_mode(mode), _check_activation(activation)
    a = prod(shape) * itemsize
    fc = shape[1] * hidden_channels * itemsize
    sizes = {name: a for name in ("x", "scaled", "sum", "out", "residual", "grad_out", "grad_sum", "grad_x_gate",
                                  "grad_gate_product", "grad_x_mean", "grad_x", "grad_residual")}
    sizes.update({name: fc for name in ("fc1_weight", "fc2_weight", "grad_fc1_weight", "grad_fc2_weight")})
    res = "residual" if residual else None
    unfused, fused = _Passes(sizes), _Passes(sizes)
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
    return Traffic("se_excite", mode, tuple(unfused.passes), tuple(fused.passes))


def bn_act_conv(x_shape, weight_shape, *, stride=1, padding=0, dilation=1, activation="relu", mode="eval",
                itemsize=4) -> Traffic:
    """conv2d(act(bn(x)), weight): x [N, C_in, H, W], weight [C_out, C_in/g, kH, kW]."""
    train, relu = _check_mode(mode), _check_activation(activation)
    x = prod(x_shape) * itemsize
    w = prod(weight_shape) * itemsize
    y = prod(conv_output_shape(x_shape, weight_shape, stride, padding, dilation)) * itemsize
    sizes = {"weight": w, "grad_weight": w, "out": y, "grad_out": y}
    sizes.update({name: x for name in ("x", "bn_out", "act_out", "grad_act", "grad_bn_out", "grad_x")})
    conv_in = "act_out" if relu else "bn_out"
    unfused, fused = _Passes(sizes), _Passes(sizes)
    if train:
        unfused.add("batch_norm statistics", ("x",))
        fused.add("batch statistics", ("x",))
    unfused.add("batch_norm", ("x",), ("bn_out",))
    unfused.add("relu", ("bn_out",), ("act_out",), when=relu)
    unfused.add("conv2d", (conv_in, "weight"), ("out",))
    fused.add("conv2d with bn + act prologue", ("x", "weight"), ("out",))
    if train:
        grad_bn = "grad_bn_out" if relu else "grad_act"
        unfused.add("conv2d backward input", ("grad_out", "weight"), ("grad_act",))
        unfused.add("conv2d backward weight", ("grad_out", conv_in), ("grad_weight",))
        unfused.add("relu backward", ("grad_act", "act_out"), ("grad_bn_out",), when=relu)
        unfused.add("batch_norm backward reduce", (grad_bn, "x"))
        unfused.add("batch_norm backward", (grad_bn, "x"), ("grad_x",))
        fused.add("conv2d backward input", ("grad_out", "weight"), ("grad_act",))
        fused.add("conv2d backward weight, bn + act recomputed from x", ("grad_out", "x"), ("grad_weight",))
        fused.add("bn + act backward reduce", ("grad_act", "x"))
        fused.add("bn + act backward elementwise", ("grad_act", "x"), ("grad_x",))
    return Traffic("bn_act_conv", mode, tuple(unfused.passes), tuple(fused.passes))
