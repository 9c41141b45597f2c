"""A frozen DenseBlock's layers as one recorded plan: the per-call Python of the frozen CPU
path (cnnkernels/nn/frozen_cpu.py) paid once per block instead of once per unit.

The first frozen call of a block runs its layers one by one (dense_block._frozen_layer),
which folds and packs every weight into the modules' freeze caches. record() then keeps,
per layer, what the calls read from those caches: norm1's scale and shift, conv1 with
norm2 folded (packed for the prefix's shape), conv2 packed, and their convolution
arguments. run() replays them: per layer one scale-shift-ReLU pass into the scratch, two
oneDNN convolutions and the copy of the new features into the block's buffer, the same
calls the per-layer path makes, so the results are the same bit for bit. With the
extension, where the buffer is in the compute dtype, the block's layers run in one call of
_dense_block_frozen_native (csrc/cpu/dense_block_frozen.cpp), which makes those calls
from C++: nine Python op calls per layer (four of them views) become one per block.

A plan is kept per (dtype, buffer shape), at most frozen_cpu.MAX_PACKED_SHAPES of them,
and used only while the block's state is the state it was recorded in: the identity,
training flag and freeze mark of each norm and conv module, every parameter and buffer
(storage and version counter, as freeze's caches are keyed) and each BatchNorm's eps.
Anything else (a change, a module in training mode, unfreeze) makes run() return False,
and the caller takes the per-layer path, which re-folds what changed. unfreeze drops the
plans with the caches.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cnnkernels.nn import frozen_cpu
from cnnkernels.nn.freeze import _ATTR as _FROZEN
from cnnkernels.nn.freeze import _PLANS, _key

__all__ = ["run", "record"]

class _Plans(OrderedDict):
    """A block's plans by (dtype, buffer shape), oldest first. Like frozen_cpu.PackedWeights,
    a deep-copied or pickled block starts with none (oneDNN's packed tensors have no
    storage to copy) and records again."""

    def __deepcopy__(self, memo):
        return _Plans()

    def __reduce__(self):
        return _Plans, ()
_UNITS = ("norm1", "conv1", "norm2", "conv2")


def _state(block: nn.Module) -> tuple | None:
    """What the plan's validity depends on (module docstring); None when a tensor cannot be
    keyed (an inference tensor has no version counter)."""
    state = []
    for layer in block._modules.values():
        for name in _UNITS:
            m = layer._modules[name]
            key = _key([*m._parameters.values(), *m._buffers.values()], getattr(m, "eps", None))
            if key is None:
                return None
            state.append((id(m), m.training, _FROZEN in m.__dict__, *key))
    return tuple(state)


def _packed(module: nn.Module, role: str, dtype: torch.dtype, shape: tuple):
    """The (weight, bias) packed for (dtype, shape) in module's freeze cache under role."""
    entry = module.__dict__[_FROZEN].get(role)
    if entry is None:
        return None
    return entry[1][1].by_shape.get((dtype, torch.Size(shape)))


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def record(block: nn.Module, buf_shape: torch.Size, dtype: torch.dtype) -> None:
    """After a call in which every layer of block took the frozen path in dtype on a buffer
    of buf_shape: keep the plan of that call (nothing when a cache entry is missing)."""
    state = _state(block)
    if state is None:
        return
    n, c, h, w = buf_shape
    c -= len(block) * block.growth_rate
    layers = []
    for layer in block._modules.values():
        norm1, conv1, norm2, conv2 = (layer._modules[name] for name in _UNITS)
        scale_shift = norm1.__dict__[_FROZEN].get("bn_act")
        first = _packed(norm2, "conv_bn", dtype, (n, c, h, w))
        second = _packed(conv2, "conv", dtype, (n, conv1.out_channels, h, w))
        if scale_shift is None or first is None or second is None:
            return
        layers.append((scale_shift[1], first, _conv_args(conv1), second, _conv_args(conv2)))
        c += block.growth_rate
    plans = block.__dict__.setdefault(_PLANS, _Plans())
    plans[(dtype, tuple(buf_shape))] = (state, layers, _native_arguments(layers))
    while len(plans) > frozen_cpu.MAX_PACKED_SHAPES:
        plans.popitem(last=False)


def _native_arguments(layers: list) -> tuple | None:
    """The arguments after (buf, c0, scratch) of _dense_block_frozen_native for these
    layers; None where their convolutions' arguments differ (the op takes one set each)."""
    conv1, conv2 = ({_flat(layer[i]) for layer in layers} for i in (2, 4))
    if len(conv1) != 1 or len(conv2) != 1:
        return None
    return ([layer[0]["vectors"][0] for layer in layers], [layer[0]["vectors"][1] for layer in layers],
            [layer[1][0] for layer in layers], [layer[1][1] for layer in layers],
            [layer[3][0] for layer in layers], [layer[3][1] for layer in layers], list(conv1.pop()),
            list(conv2.pop()))


def _flat(conv_args: tuple) -> tuple:
    padding, stride, dilation, groups = conv_args
    return (*padding, *stride, *dilation, groups)


def run(block: nn.Module, buf: torch.Tensor, c: int, scratch: torch.Tensor, dtype: torch.dtype) -> bool:
    """Every layer of block into buf (its first c channels filled) by the recorded plan for
    (dtype, buf's shape); False, with buf untouched, where no valid plan exists."""
    plans = block.__dict__.get(_PLANS)
    plan = None if plans is None else plans.get((dtype, tuple(buf.shape)))
    if plan is None or plan[0] != _state(block):
        return False
    native_arguments = plan[2]
    if native_arguments is not None and buf.dtype == dtype and frozen_cpu.native("_dense_block_frozen_native"):
        torch.ops.cnnkernels._dense_block_frozen_native(buf, c, scratch, *native_arguments)
        return True
    n, _, h, w = buf.shape
    k = block.growth_rate
    native = buf.dtype == dtype and frozen_cpu.native("_scale_shift_act_into_native")
    ssa = torch.ops.cnnkernels._scale_shift_act_into_native if native else None
    conv = torch.ops.mkldnn._convolution_pointwise
    for scale_shift, (w1, b1), args1, (w2, b2), args2 in plan[1]:
        prefix = buf[:, :c]
        z = scratch[:n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)
        if ssa is not None:
            ssa(z, prefix, *scale_shift["vectors"], "relu")
        else:
            frozen_cpu.bn_act(scale_shift, prefix, dtype, "relu", z)
        bottleneck = conv(z, w1, b1, *args1, "relu", [], None)
        buf[:, c:c + k].copy_(conv(bottleneck, w2, b2, *args2, "none", [], None))
        c += k
    return True
