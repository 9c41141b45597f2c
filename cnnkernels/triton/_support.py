"""What every Triton backend of this package shares before it launches: triton itself
(or why it cannot be imported), the accumulation dtype of its kernels and the checks of
unsupported_reasons() (device, dtype, activation; the convolution shapes of conv_bn_act
and bn_act_conv).

Importable without triton installed: the kernel modules take triton, tl, kernel and jit
from here, so they import too (their kernels are then plain functions that nothing
launches), and their unsupported_reasons() start with missing_triton().
"""
from __future__ import annotations

import torch

from cnnkernels import reference

try:
    import triton
    import triton.language as tl

    from cnnkernels.triton._launch import kernel
except ImportError as _error:
    triton = tl = None
    _IMPORT_ERROR = str(_error)

    def kernel(fn):
        """Without triton: the kernel stays a plain function (missing_triton() says why)."""
        return fn

    jit = kernel
else:
    _IMPORT_ERROR = None
    jit = triton.jit  # device functions, inlined into the kernels that call them


def missing_triton() -> list[str]:
    """[why triton cannot be imported], or [] when it can: the first check of every
    Triton backend's unsupported_reasons()."""
    return [] if _IMPORT_ERROR is None else [f"triton is not installed ({_IMPORT_ERROR})"]

# Triton before 3.8 (3.6 is the one torch 2.11 pulls in) compiles four tile configurations
# of the conv kernels to code that spills 4-16 bytes of registers on sm_80 where 3.8 spills
# none (ptxas -v, tests/triton/*_aot.py): the tables (conv1x1_bn_act, grouped_conv_bn_act,
# _conv_tiles) give those more warps or fewer pipeline stages there. Same tile sizes, and
# 3.8 gets exactly the tables it had. (A fifth, se_excite's backward elementwise kernel,
# runs on 8 warps under every version: it is elementwise.)
TRITON_BEFORE_3_8 = triton is not None and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8)


def acc_dtype(dtype: torch.dtype):
    """The kernels' accumulation dtype: float64 for float64 input (interpreter only), else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tensor_reasons(t: torch.Tensor, activation: str) -> list[str]:
    """Why the Triton backends cannot run on t's device / dtype or this activation ([] when
    they can). CUDA tensors run compiled; CPU tensors run through Triton's interpreter
    (slow, for tests). float64 runs only in the interpreter."""
    reasons = []
    if t.device.type not in ("cpu", "cuda"):
        reasons.append(f"tensors on {t.device.type} are not supported (cuda, or cpu via the interpreter)")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        reasons.append(f"{t.dtype} is not supported")
    if t.dtype == torch.float64 and t.device.type == "cuda":
        reasons.append("float64 is not supported on GPU (only in the interpreter on CPU tensors)")
    if activation not in reference.ACTIVATIONS:
        reasons.append(f"activation {activation!r} is not supported")
    return reasons


def conv_reasons(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> list[str]:
    """Why the convolution shapes cannot run ([] when they can): 4-D, non-empty input,
    weight and output."""
    if x.dim() != 4 or weight.dim() != 4:
        return ["x and weight must be 4-D"]
    if x.numel() == 0 or weight.numel() == 0:
        return ["zero-size input or weight"]
    if any(v < 1 for v in reference.conv_output_size(x.shape, weight.shape, stride, padding, dilation)):
        return ["zero-size output"]
    return []


INT32_MAX = 2 ** 31 - 1
MAX_ROWS = 2 ** 31 - 2 ** 24
"""The most rows (pixels N*H*W) index_reasons() lets through: int32 row indices with
room for the last row tile and for the last split of a reduction (at most 1/256 of the
rows, _bn.splits) past the end."""


def sample_span(t) -> int:
    """Elements a tensor spans within one sample, dims 1.. (1 + sum of (size - 1) * stride),
    at least its elements per sample (what a dense copy spans); t a tensor, or the shape of
    a dense tensor a launcher allocates."""
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    dense = 1
    for size in shape[1:]:
        dense *= size
    if not isinstance(t, torch.Tensor) or dense == 0:
        return dense
    return max(dense, 1 + sum((size - 1) * abs(stride) for size, stride in zip(shape[1:], t.stride()[1:])))


def index_reasons(rows: int, tensors: dict) -> list[str]:
    """Why the kernels' 32-bit index arithmetic could overflow here ([] when it cannot).

    The Triton kernels of conv_bn_act, bn_act_conv and se_excite address element
    (n, c, h, w) as n * stride_n in int64 plus c * stride_c + h * stride_h + w * stride_w
    in int32, and number the rows of their tiles (flattened pixels) in int32: 64-bit
    arithmetic throughout would put 64-bit divisions on every element. So every tensor
    must span at most 2^31 elements within a sample (sample_span; tensors {name: tensor
    or dense shape}, None skipped) and rows (the most pixels N*H*W of any of them) stay
    within MAX_ROWS. add_act indexes in int64 and does not call this."""
    reasons = []
    if rows > MAX_ROWS:
        reasons.append(f"{rows} rows (N*H*W pixels) exceed the {MAX_ROWS} that the Triton kernels' int32 row "
                       "indices allow")
    for name, t in tensors.items():
        span = 0 if t is None else sample_span(t)
        if span > INT32_MAX + 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
            reasons.append(f"{name} of shape {shape} spans {span} elements within one sample, more than the 2^31 "
                           "that the Triton kernels' int32 offsets address")
    return reasons


def channels_last_aligned(t: torch.Tensor) -> bool:
    """What Triton's specialisation sees as a channels-last tensor whose channel runs
    can be read and written as vectors: channel stride 1, the other strides and the
    address 16-aligned (Triton marks ints divisible by 16 and 16-byte aligned pointers).
    Unaligned launches compile to per-element addressing and get smaller tiles."""
    return (t.stride(1) == 1 and all(s % 16 == 0 for s in (t.stride(0), t.stride(2), t.stride(3)))
            and t.data_ptr() % 16 == 0)
