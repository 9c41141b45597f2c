"""The frozen CPU inference path: one oneDNN call per conv-BN pair, weights prepacked once.

For a BatchNorm marked by cnnkernels.nn.freeze, conv_bn_act_modules runs
act(conv(x, W * s) + t (+ residual)) as one torch.ops.mkldnn._convolution_pointwise call
(the binary form with the residual: add, then the activation, as oneDNN post-ops), the
same call torch.compile's frozen CPU graphs make. W * s and t are folded once
(freeze.py's arithmetic), and the folded weight is reordered once into the blocked
layout oneDNN picks for the input's shape and memory format
(mkldnn._reorder_convolution_weight) and kept. Per call, only the key check below and the
convolution run: no weight fold, no weight reorder, no extra pass over the output.

DenseNet's pre-activation units (relu(bn(x)) -> conv) take the same packed convolution
after one addcmul + in-place ReLU pass (bn_act); see freeze.run_frozen_cpu_bn_act_conv.

Taken when all of these hold, else the caller's plain path runs (which also raises the
op's errors for bad arguments):
- torch was built with oneDNN and it is enabled; not under torch.compile tracing;
- x is a 4-D CPU tensor, channels_last-contiguous, float32 or bfloat16; no gradient is
  wanted (torch.no_grad, inference_mode, or no parameter requiring grad);
- the convolution runs in float32 (x and the weight float32, autocast off) or on
  bfloat16 data (CPU autocast to bfloat16, or x and the weight bfloat16): in bfloat16
  where oneDNN has bfloat16 convolutions (AVX-512, AVX512-BF16, AMX), in float32 with the
  result rounded to bfloat16 elsewhere (compute_dtype);
- a residual, if any, is a CPU tensor of the output's shape.

The prepacked weights follow the module like the folded ones (freeze.py): they are
rebuilt when a parameter or buffer changes (storages and version counters), and dropped
by unfreeze. One packed copy is kept per (dtype, input shape); the oldest goes when a
fifth shape arrives, so a model fed many shapes holds at most four packed copies of its
convolution weights per dtype. A packed weight made for one shape still runs another
(oneDNN reorders it per call then), but at batch 1 a weight packed for batch 8 runs at
about half speed on AVX-512, hence the key on the shape.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn

from cnnkernels.ops._checks import effective_dilation

__all__ = ["compute_dtype", "result_dtype", "frozen_conv_bn_act", "bn_act", "max_pool", "se_excite_into",
           "MAX_PACKED_SHAPES"]

MAX_PACKED_SHAPES = 4
_ONEDNN = getattr(torch.ops, "mkldnn", None)


def _onednn_usable() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(_ONEDNN, "_convolution_pointwise") and hasattr(_ONEDNN, "_reorder_convolution_weight"))


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_USABLE = None  # decided at the first call: (oneDNN usable, bfloat16 supported)


def _support() -> tuple[bool, bool]:
    global _USABLE
    if _USABLE is None:
        usable = _onednn_usable()
        _USABLE = (usable, usable and _bf16_supported())
    return _USABLE


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the convolution runs in on the frozen path, None where that path does not apply.

    bfloat16 work (autocast to bfloat16, or x and the weight bfloat16) runs in bfloat16 where
    oneDNN has bfloat16 convolutions, and in float32 on a CPU without them (AVX2 only): there
    torch's bfloat16 convolutions run about 6x slower than float32 ones (torchvision resnet50,
    batch 8, 2 threads, AMD EPYC with AVX2: 4.67 s against 0.72 s per forward). The caller
    rounds the result to bfloat16 (result_dtype), so callers see autocast's dtypes; the values
    are a bfloat16 convolution's with float32 accumulation, minus the rounding of the folded
    weight to bfloat16."""
    usable, bf16 = _support()
    if not usable:
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        if weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        return torch.bfloat16 if bf16 else torch.float32
    if x.dtype != weight.dtype:
        return None
    if x.dtype == torch.float32:
        return torch.float32
    if x.dtype == torch.bfloat16:
        return torch.bfloat16 if bf16 else torch.float32
    return None


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a conv op's result on input x: autocast's where CPU autocast is on, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class PackedWeights:
    """The packed (weight, bias) of one conv-BN pair per (dtype, input shape), newest last."""

    def __init__(self):
        self.by_shape: OrderedDict = OrderedDict()

    # oneDNN's packed tensors have no storage to copy or pickle: a copied or pickled model
    # (deepcopy, torch.save of the module) starts with none and packs again on its first call.
    def __deepcopy__(self, memo):
        return PackedWeights()

    def __reduce__(self):
        return PackedWeights, ()

    def get(self, folded: tuple, conv: nn.Conv2d, dtype: torch.dtype, shape: torch.Size):
        key = (dtype, shape)
        packed = self.by_shape.get(key)
        if packed is None:
            packed = _pack(folded, conv, dtype, shape)
            self.by_shape[key] = packed
            if len(self.by_shape) > MAX_PACKED_SHAPES:
                self.by_shape.popitem(last=False)
        return packed


def _pack(folded: tuple, conv: nn.Conv2d, dtype: torch.dtype, shape: torch.Size):
    weight, shift = folded[0], folded[3]
    with torch.no_grad():
        dense = weight.to(dtype).contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            dense, list(conv.padding), list(conv.stride), effective_dilation(conv.kernel_size, conv.dilation),
            conv.groups, list(shape))
        return packed, None if shift is None else shift.to(dtype)


def scale_shift(bn: nn.BatchNorm2d) -> dict:
    """{dtype: (scale, shift)} of eval bn, [C] float32 each (the C++ pass's form), and
    [1, C, 1, 1] in float32 and bfloat16 for the plain-torch form act(x * scale + shift);
    freeze.py caches it per BatchNorm."""
    scale = bn.running_var.float().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    pair = (scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1))
    return {"vectors": (scale.contiguous(), shift.contiguous()), torch.float32: pair,
            torch.bfloat16: tuple(t.to(torch.bfloat16) for t in pair)}


@functools.cache
def native(op_name: str) -> bool:
    """Whether the extension registered a CPU kernel of the native helper op_name."""
    from cnnkernels import _library
    return _library.has_native_kernel(op_name, "CPU")


def bn_act(scale_shift_of: dict, x: torch.Tensor, dtype: torch.dtype, activation: str,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x * scale + shift) in `dtype` (scale_shift's pair for it), written into `out`
    (x's shape, channels_last) when given. x is read through its strides (a channel-prefix
    view costs no copy). With the extension: one vectorised C++ pass, float32 arithmetic
    and one rounding to `dtype`; without it: an addcmul in `dtype`, then the activation in
    place."""
    if x.dtype == dtype and native("_scale_shift_act_into_native"):
        if out is None:
            out = torch.empty(x.shape, dtype=dtype, memory_format=torch.channels_last)
        torch.ops.cnnkernels._scale_shift_act_into_native(out, x, *scale_shift_of["vectors"], activation)
        return out
    scale, shift = scale_shift_of[dtype]
    with torch.autocast("cpu", enabled=False):
        z = torch.addcmul(shift, x.to(dtype), scale, out=out)
    return z.relu_() if activation == "relu" else z


def hooked(modules) -> bool:
    """Whether a forward (pre-)hook could see a tensor passed between these modules (a
    path that skips their __call__ must not be taken then)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _inference_ready(x: torch.Tensor, module: nn.Module, params=()) -> bool:
    """x a channels_last 4-D floating CPU tensor, no gradient wanted of x or params, no
    hook on module (its __call__ is skipped), torch.compile not tracing."""
    if x.device.type != "cpu" or x.dim() != 4 or not x.is_floating_point():
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return False
    return not (torch.compiler.is_compiling() or hooked((module,)))


def max_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """pool(x) for an nn.MaxPool2d without return_indices, computed without the int64
    indices that ATen's CPU max pooling always makes (at batch 8 after a ResNet stem:
    12.8 MB written per call for nothing): one C++ pass over channels_last x, giving the
    same values as torch (NaN propagates, padding never wins). [N, C, H, W] ->
    [N, C, H_out, W_out] channels_last. None where it does not apply (the extension or
    its kernel missing, x not a channels_last 4-D floating CPU tensor, a gradient wanted,
    under torch.compile, a hook on pool): the caller then calls pool(x)."""
    if type(pool) is not nn.MaxPool2d or pool.return_indices or not _inference_ready(x, pool):
        return None
    if not native("_max_pool2d_channels_last_native"):
        return None
    pair = nn.modules.utils._pair
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return torch.ops.cnnkernels._max_pool2d_channels_last_native(
        x, pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation), pool.ceil_mode)


def se_excite_into(se: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, activation: str) -> bool:
    """se(x, residual, activation) (a SqueezeExcite: act(x * gate(x) + residual)) written
    into x itself, for a caller that owns x (a block's own intermediate): no output tensor
    is allocated. [N, C, H, W] channels_last. Returns whether it ran; False (x untouched)
    where it does not apply: the extension's kernel missing, x not a channels_last 4-D
    CPU tensor, a gradient wanted, autocast wanting another dtype than x's, a residual of
    another shape or dtype, a hook on se, under torch.compile."""
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return False
    fc1, fc2 = se.fc1, se.fc2
    if not _inference_ready(x, se, (fc1.weight, fc1.bias, fc2.weight, fc2.bias)):
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != x.dtype:
        return False
    if not native("_se_excite_inplace_native"):
        return False
    torch.ops.cnnkernels._se_excite_inplace_native(x, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1),
                                                   fc2.bias, residual, activation)
    return True


def applies(x: torch.Tensor, residual: torch.Tensor | None, views: bool = False) -> bool:
    """The input conditions of the module docstring that do not depend on the modules;
    views: x may also be a channel-prefix view of a channels_last tensor (unit channel stride)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return False
    if not (x.is_contiguous(memory_format=torch.channels_last) or (views and x.stride(1) == 1)):
        return False
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.device.type != "cpu"
                                 or residual.dim() != 4):
        return False
    return not torch.compiler.is_compiling()


def frozen_conv_bn_act(conv: nn.Conv2d, folded: tuple, packed: PackedWeights, x: torch.Tensor,
                       residual: torch.Tensor | None, activation: str, dtype: torch.dtype,
                       overwrite_residual: bool = False,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """act(conv(x) folded with BN (+ residual)) in one oneDNN call; [N, C_in, H, W] ->
    [N, C_out, H_out, W_out] channels_last, computed in `dtype`, returned in out_dtype
    (None: `dtype`). None where x's channels are not the conv's or the residual's shape is
    not the output's (the caller's plain path then names the error). overwrite_residual: the
    caller's promise that nothing reads the residual afterwards; the result is then written
    into it (oneDNN's in-place sum form, as torch.compile's frozen graphs do) when its dtype
    and layout allow, which spares allocating (and on Linux page-faulting in) a fresh output."""
    if x.shape[1] != conv.in_channels:
        return None
    if residual is not None:
        out_hw = [(x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
                  // conv.stride[i] + 1 for i in range(2)]
        if list(residual.shape) != [x.shape[0], conv.out_channels, *out_hw]:
            return None
    weight, bias = packed.get(folded, conv, dtype, x.shape)
    dilation = effective_dilation(conv.kernel_size, conv.dilation)
    if x.dtype != dtype:
        x = x.to(dtype)
    post = "relu" if activation == "relu" else "none"
    if residual is None:
        out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, conv.padding, conv.stride, dilation,
                                                      conv.groups, post, [], None)
    else:
        out = _with_residual(x, weight, bias, conv, dilation, residual, post, dtype, overwrite_residual)
    return out if out_dtype in (None, out.dtype) else out.to(out_dtype)


def _with_residual(x, weight, bias, conv: nn.Conv2d, dilation: list, residual: torch.Tensor, post: str,
                   dtype: torch.dtype, overwrite_residual: bool) -> torch.Tensor:
    unary = None if post == "none" else post
    writable = residual.dtype == dtype and residual.is_contiguous(memory_format=torch.channels_last)
    if not (overwrite_residual and writable) and dtype == torch.bfloat16 and conv.groups > 1:
        # torch 2.14's out-of-place form fails an internal assert for grouped bfloat16
        # ("Unsupported datatype for add_relu"); the in-place form into a copy works.
        residual, writable = residual.to(dtype).clone(memory_format=torch.channels_last), True
        overwrite_residual = True
    if overwrite_residual and writable:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, conv.padding, conv.stride, dilation, conv.groups, "add", None, unary,
            [], None)
    if residual.dtype != dtype:
        residual = residual.to(dtype)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, conv.padding, conv.stride, dilation, conv.groups, "add", None, unary, [],
        None)
