"""torch.autocast for the fused ops, as torch's own ops behave inside an autocast region.

Where autocast is on for x's device, a fused op runs its convolution (or the SE block's
FC layers) in autocast's lower-precision dtype, like torch's conv2d / linear there: x,
the conv weight and bias, the FC weights and biases and the residual are cast to it;
BatchNorm parameters and running statistics are left as they are (the ops take float32
ones with half-precision x, as cuDNN's batch norm does), so running statistics keep
accumulating in float32. float64 input is never cast (autocast leaves float64 alone).
The casts are ordinary differentiable tensor.to() calls: float32 parameters get float32
gradients, and torch.compile traces them.
"""
from __future__ import annotations

import contextlib

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def lower_precision(x: torch.Tensor) -> torch.dtype | None:
    """autocast's dtype for x's device when autocast is on there and x may be cast, else None
    (also for a non-tensor x: the op's checks then name the error)."""
    if not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or x.dtype not in _CASTABLE:
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(dtype: torch.dtype | None, *tensors):
    """tensors with every floating non-float64 one cast to dtype (None: unchanged)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in _CASTABLE and t.dtype != dtype else t for t in tensors)


def promote(x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For element-wise ops inside an autocast region (torch's add runs there by type
    promotion): x and other in their promoted dtype when they differ."""
    if lower_precision(x) is None or not isinstance(other, torch.Tensor) or other.dtype == x.dtype \
            or other.dtype not in _CASTABLE:
        return x, other
    dtype = torch.promote_types(x.dtype, other.dtype)
    return x.to(dtype), other.to(dtype)


def enabled() -> bool:
    """Whether autocast is on for cpu or cuda in this thread."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


@contextlib.contextmanager
def suspended():
    """Autocast off on cpu and cuda for the block: an op's implementation (the reference
    backend's torch calls, the C++ kernels' ATen calls) must run in the dtypes it was
    given, not recast by an autocast region around the op."""
    on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    with contextlib.ExitStack() as stack:
        for device_type in on:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
