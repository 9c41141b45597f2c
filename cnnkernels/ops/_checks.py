"""Argument checks shared by the ops: each error names the argument and what was wrong."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def effective_dilation(kernel_size, dilation) -> list[int]:
    """dilation with 1 on each axis where the kernel is 1 wide: the same convolution (a
    single tap has nothing to space), and it keeps oneDNN's brgemm convolution (torch 2.14)
    off a path that crashes the process (1-wide dilated kernels, channels_last, bias,
    groups, stride 2)."""
    return [1 if k == 1 else d for k, d in zip(kernel_size, dilation)]


def check_tensor(t, name: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def check_like(t, name: str, x: torch.Tensor, x_name: str = "x") -> None:
    """Same dtype and device as x."""
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}; they must match")
    check_device(t, name, x, x_name)


def check_device(t, name: str, x: torch.Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}; they must be on one device")


def check_per_channel(t, name: str, channels: int, x: torch.Tensor, what: str) -> None:
    """A 1-D per-channel parameter: float32 or x's dtype, on x's device, `channels` long
    (one per `what`)."""
    if t is None:
        return
    check_tensor(t, name, ndim=1)
    check_device(t, name, x)
    if t.numel() != channels:
        raise ValueError(f"{name} must have {channels} elements (one per {what}), got {t.numel()}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")


def check_positive(values: tuple[int, int], name: str, minimum: int = 1) -> None:
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {values}")


def check_activation(activation, allowed: Sequence[str]) -> None:
    if activation not in allowed:
        raise ValueError(f"activation must be one of {', '.join(map(repr, allowed))}, got {activation!r}")
