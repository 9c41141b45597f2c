"""What each fused op costs, declared with the op (cnnkernels/ops/<op>.py passes its two
models to ops._registration.declare_call), for the tables built from them:

- OpCost, for cnnkernels.analysis: one call's kinds (its fused steps, "conv", "bn",
  "add", "relu", ...), multiply-adds, the tensors it reads (the primary input, extra
  inputs, weights) and writes, and the bytes its steps would move run one by one.
- Traffic, for cnnkernels.bench.traffic: the passes over memory of the unfused torch
  sequence and of the fused op, counted from shapes (the counting rules are in
  cnnkernels/bench/traffic.py's docstring).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MODES = ("eval", "train")


@dataclass
class OpCost:
    """One recorded call for cnnkernels.analysis: `kinds` its steps in order, `primary`
    the input an epilogue would chain on, `extra` its other inputs, `weights` its weights
    and per-channel vectors, `out` its final output, `flops` multiply-adds, `bytes_unfused`
    what its steps move run one by one, `view` True for a call that moves nothing."""
    kinds: list[str]
    primary: Optional[torch.Tensor]
    extra: list[torch.Tensor]
    weights: list
    out: torch.Tensor
    flops: int
    bytes_unfused: int
    view: bool = False
    module: str = ""


def nbytes(*tensors) -> int:
    """Bytes of the given tensors (None and non-tensors count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def epilogue_bytes(out: torch.Tensor, residual, activation: str) -> int:
    """What an unfused residual add (read two, write one) and activation (read, write) move."""
    return (3 * nbytes(out) if residual is not None else 0) + (2 * nbytes(out) if activation != "none" else 0)


def steps(head: list[str], residual: bool, activation: str) -> list[str]:
    """head, then "add" for a residual, then the activation unless it is "none"."""
    return head + (["add"] if residual else []) + ([activation] if activation != "none" else [])


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


class Passes:
    """Builds passes from tensor names; sizes maps each name to its bytes."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.passes: list[Pass] = []

    def add(self, name: str, reads, writes=(), when: bool = True) -> None:
        if when:
            self.passes.append(Pass(name, tuple((t, self.sizes[t]) for t in reads if t),
                                    tuple((t, self.sizes[t]) for t in writes if t)))


def check_mode(mode: str) -> bool:
    """True for "train", False for "eval"; anything else is a ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode == "train"


def check_activation(activation: str) -> bool:
    """True for "relu", False for "none"; anything else is a ValueError."""
    if activation not in ("relu", "none"):
        raise ValueError(f"activation must be 'relu' or 'none', got {activation!r}")
    return activation == "relu"


def pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_shape(x_shape, weight_shape, stride=1, padding=0, dilation=1) -> tuple[int, int, int, int]:
    """[N, C_out, H_out, W_out] of conv2d(x [N, C_in, H, W], weight [C_out, C_in/g, kH, kW])."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, _, h, w = x_shape
    kh, kw = weight_shape[2:]
    return (n, weight_shape[0], (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
