"""DenseBlock: a DenseNet-BC dense block with concatenation in place (Pleiss et al. 2017,
"Memory-Efficient Implementation of DenseNets"), with torchvision's _DenseBlock keys.

One feature buffer [N, C_in + L * k, H, W] is allocated per forward. The block input is
copied once into its first C_in channels; layer i reads the channel-prefix view
buf[:, :c_i] (c_i = C_in + i * k, no copy, no torch.cat) and its 3x3 convolution writes
its k new channels straight into buf[:, c_i:c_i + k] (bn_act_conv with out=).

Training memory. One torch.autograd.Function runs the whole block. It keeps for
backward only the buffer (which is the block's output anyway), two [C] statistics
vectors per BatchNorm, the parameters, the dropout masks (1 byte per new value) and,
with memory_efficient=False, each layer's bottleneck output. Nothing of size
N x c_i x H x W is kept per layer: bn_act_conv_backward recomputes relu(bn(prefix)) from
the prefix view and the saved statistics, and with memory_efficient=True the bottleneck
(relu(bn1(prefix)) -> 1x1 conv) is recomputed in backward into one scratch tensor
shared by all layers. The gradient of the buffer accumulates in one gradient buffer of
the same size. So everything held grows linearly with depth, where torchvision's block
keeps each layer's concatenation and its normalised copy (quadratic).

BatchNorm semantics are torchvision's in train and eval mode: batch statistics in
training, running statistics updated once per forward with the module's momentum (or
the cumulative average when momentum is None) and the unbiased batch variance,
num_batches_tracked counted. (torchvision's memory_efficient=True checkpointing runs
norm1 twice per step and so updates its running statistics twice; this block does it
once, like torchvision's default.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from cnnkernels.nn import frozen_cpu, frozen_dense
from cnnkernels.nn.freeze import is_frozen, run_frozen_cpu_bn_act_conv
from cnnkernels.nn.functional import batch_norm_mode, bn_act_conv_modules
from cnnkernels.nn.sync_batchnorm import sync_group
from cnnkernels.ops import _autocast
from cnnkernels.ops._conv_bn_core import update_running_stats

__all__ = ["DenseBlock", "DenseLayer"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (C_in -> bn_size * k) then BN-ReLU-3x3 conv (-> k), with the
    children of torchvision's _DenseLayer: norm1, relu1, conv1, norm2, relu2, conv2.

    forward(x [N, C_in, H, W]) -> [N, k, H, W]: the layer alone, through the functional
    (autograd-recording) bn_act_conv op, dropout included. DenseBlock.forward does not
    call it (it runs its layers through its own autograd.Function); it is the layer step
    of DenseBlock.forward_functional.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        width = bn_size * growth_rate
        factory = dict(device=device, dtype=dtype)
        self.norm1 = nn.BatchNorm2d(num_input_features, **factory)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False, **factory)
        self.norm2 = nn.BatchNorm2d(width, **factory)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False, **factory)
        self.drop_rate = float(drop_rate)

    def units(self) -> tuple[tuple[nn.BatchNorm2d, nn.Conv2d], tuple[nn.BatchNorm2d, nn.Conv2d]]:
        """The two pre-activation units (norm, conv), bottleneck first."""
        return (self.norm1, self.conv1), (self.norm2, self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_act_conv_modules(self.norm1, self.conv1, x)
        out = bn_act_conv_modules(self.norm2, self.conv2, out)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """num_layers dense layers (children denselayer1 ... denselayerL, torchvision's
    _DenseBlock state_dict keys); layer i sees the block input and the outputs of all
    earlier layers, C_in + i * growth_rate channels.

    Args:
        num_layers: L.
        num_input_features: C_in, the channels of the block input.
        bn_size: bottleneck width factor (the 1x1 conv outputs bn_size * growth_rate).
        growth_rate: k, the channels each layer adds.
        drop_rate: dropout on each layer's new features in training mode (torchvision's
            F.dropout: the same masks for the same RNG state on CPU).
        memory_efficient: recompute each layer's bottleneck output in backward instead
            of keeping it (L x bn_size * k channels less to keep, one more 1x1
            convolution per layer in backward). Either way the concatenation is in place
            and normalised inputs are never kept (see the module docstring).

    forward(x [N, C_in, H, W]) -> [N, C_in + L * k, H, W] in x's memory format
    (channels_last in, channels_last out); the first C_in channels are a copy of x.

    Paths: with autograd recording (grad mode on and x or a parameter requiring grad),
    the block's autograd.Function (lean backward, above); without it, the same in-place
    forward with nothing kept. torch.compile (fullgraph=True) traces the Function as it
    is: AOTAutograd turns each out= slice write (the mutating bn_act_conv_into) into its
    functional form (auto_functionalized on the buffer), and the forward graph saves only
    the buffer, the statistics and the parameters, as in eager mode; Inductor writes the
    slices in place again (one buffer, no copies). `forward_functional` is the other
    formulation, plain autograd through the functional op with torch.slice_scatter slice
    writes; it traces too, but then AOTAutograd keeps every layer's prefix and bottleneck
    (quadratic in depth), so the block uses its Function under torch.compile as well.
    """

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_input_features", num_input_features),
                            ("bn_size", bn_size), ("growth_rate", growth_rate)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.memory_efficient = bool(memory_efficient)
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, drop_rate, device=device, dtype=dtype))

    @property
    def num_output_features(self) -> int:
        return self.num_input_features + len(self) * self.growth_rate

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.num_input_features:
            raise ValueError(f"x must be [N, {self.num_input_features}, H, W] (num_input_features="
                             f"{self.num_input_features}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if any(sync_group(norm) is not None for layer in self.values() for norm, _ in layer.units()):
            return self.forward_functional(x)  # statistics reduced over the process group per layer
        params = [p for layer in self.values() for p in _layer_params(layer)]
        dtype = _autocast.lower_precision(x)
        if dtype is not None:  # torch.autocast: x and the conv weights / biases in its dtype, BN's as they are
            (x,) = _autocast.cast(dtype, x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return _DenseBlockFunction.apply(self, x, *_autocast_conv_params(dtype, params))
        with torch.no_grad():  # each layer's parameters cast when it runs (the frozen path needs no cast)
            return _run_forward(self, x, params, keep=False, autocast_dtype=dtype)[0]

    def forward_functional(self, x: torch.Tensor) -> torch.Tensor:
        """The same block in plain autograd: every layer is the functional bn_act_conv op
        (its registered autograd), and layer i's new channels enter a new version of the
        buffer through torch.slice_scatter (the functional slice write; no torch.cat, no
        mutation). Backward keeps each layer's prefix view and bottleneck output, so this
        is not the memory-lean path; it is an independent formulation of the same
        function, checked against forward. [N, C_in, H, W] -> [N, C_in + L * k, H, W]."""
        self._check_input(x)
        n, c, h, w = x.shape
        buf = torch.empty((n, self.num_output_features, h, w), dtype=x.dtype, device=x.device,
                          memory_format=_buffer_format(x))
        buf = torch.slice_scatter(buf, x, dim=1, start=0, end=c)
        for layer in self.values():
            new = layer(buf[:, :c])
            buf = torch.slice_scatter(buf, new, dim=1, start=c, end=c + self.growth_rate)
            c += self.growth_rate
        return buf

    def extra_repr(self) -> str:
        return (f"num_input_features={self.num_input_features}, growth_rate={self.growth_rate}, "
                f"memory_efficient={self.memory_efficient}")


def _buffer_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for channels-last input (channel stride 1, not contiguous), else contiguous."""
    if x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _layer_params(layer: DenseLayer) -> list[torch.Tensor | None]:
    """bn weight, bn bias, conv weight, conv bias of each unit (8 entries, None allowed)."""
    return [t for norm, conv in layer.units() for t in (norm.weight, norm.bias, conv.weight, conv.bias)]


_PARAMS_PER_LAYER = 8
_STATS_PER_LAYER = 4  # save_mean, save_var of norm1 and of norm2


def _autocast_conv_params(dtype: torch.dtype | None, params):
    """params (groups of bn weight, bn bias, conv weight, conv bias) with the conv weights
    and biases cast to autocast's dtype (None: as they are); BN's stay in their dtype."""
    if dtype is None:
        return params
    return [p if i % 4 < 2 else _autocast.cast(dtype, p)[0] for i, p in enumerate(params)]


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _bn_act_conv_forward(norm: nn.BatchNorm2d, conv: nn.Conv2d, unit_params, x: torch.Tensor,
                         out: torch.Tensor | None):
    """relu(norm(x)) -> conv with unit_params (bn weight, bn bias, conv weight, conv bias:
    the modules' own, or their autocast copies), written into `out` when given (else a new
    tensor), running statistics updated as norm.forward would. Returns (out, save_mean,
    save_var, training)."""
    bn_weight, bn_bias, weight, bias = unit_params
    training, momentum, running_mean, running_var = batch_norm_mode(norm)
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *_conv_args(conv),
            training, norm.eps, "relu")
    if out is None:
        out, save_mean, save_var = torch.ops.cnnkernels.bn_act_conv(*args)
    else:
        save_mean, save_var = torch.ops.cnnkernels.bn_act_conv_into(out, *args)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, save_mean, save_var, x, momentum)
    return out, save_mean, save_var, training


def _run_forward(block: DenseBlock, x: torch.Tensor, params, keep: bool, autocast_dtype: torch.dtype | None = None):
    """The in-place forward. Returns (buf, records): per layer, with keep=True,
    (save_mean1, save_var1, save_mean2, save_var2, dropout mask or None, bottleneck or
    None (kept only when not block.memory_efficient), training1, training2).
    autocast_dtype: cast a layer's conv parameters to it when the layer takes the plain step."""
    n, c, h, w = x.shape
    k = block.growth_rate
    buf = torch.empty((n, block.num_output_features, h, w), dtype=x.dtype, device=x.device,
                      memory_format=_buffer_format(x))
    buf[:, :c].copy_(x)
    records = []
    scratch = None if keep else _frozen_scratch(block, buf)
    if scratch is not None and frozen_dense.run(block, buf, c, scratch, scratch.dtype):
        return buf, records
    all_frozen = scratch is not None
    for i, layer in enumerate(block.values()):
        (norm1, conv1), (norm2, conv2) = layer.units()
        if scratch is not None:
            new = _frozen_layer(layer, buf[:, :c], scratch)
            if new is not None:
                buf[:, c:c + k].copy_(new)
                c += k
                continue
        all_frozen = False
        layer_params = _autocast_conv_params(autocast_dtype, params[_PARAMS_PER_LAYER * i:_PARAMS_PER_LAYER * (i + 1)])
        unit1, unit2 = layer_params[:4], layer_params[4:]
        bottleneck, mean1, var1, training1 = _bn_act_conv_forward(norm1, conv1, unit1, buf[:, :c], None)
        new = buf[:, c:c + k]
        _, mean2, var2, training2 = _bn_act_conv_forward(norm2, conv2, unit2, bottleneck, new)
        mask = None
        if layer.drop_rate > 0 and layer.training:
            # aten.native_dropout is what F.dropout runs (CUDA) or matches draw for draw (CPU).
            dropped, mask = torch.ops.aten.native_dropout(new, layer.drop_rate, True)
            new.copy_(dropped)
            del dropped
        if keep:
            records.append((mean1, var1, mean2, var2, mask, None if block.memory_efficient else bottleneck,
                            training1, training2))
        del bottleneck
        c += k
    if all_frozen:
        frozen_dense.record(block, buf.shape, scratch.dtype)
    return buf, records


def _frozen_scratch(block: DenseBlock, buf: torch.Tensor) -> torch.Tensor | None:
    """For a block of a frozen model on the CPU path of cnnkernels.nn.freeze: one flat
    tensor that holds each layer's relu(norm1(prefix)) in turn; None otherwise."""
    first = block["denselayer1"]
    if not is_frozen(first.norm1) or not frozen_cpu.applies(buf, None):
        return None
    dtype = frozen_cpu.compute_dtype(buf, first.conv1.weight)
    if dtype is None:
        return None
    n, _, h, w = buf.shape
    widest = block.num_output_features - block.growth_rate
    return torch.empty(n * widest * h * w, dtype=dtype, device=buf.device)


def _frozen_layer(layer: DenseLayer, prefix: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor | None:
    """The layer's new features [N, k, H, W] on the frozen CPU path: relu(norm1(prefix))
    into scratch, conv1 with norm2 folded and relu2 as one packed call, conv2 packed;
    None where the path does not apply (the caller runs the layer's plain step)."""
    if layer.training and layer.drop_rate > 0:
        return None
    bottleneck = run_frozen_cpu_bn_act_conv(layer.norm1, layer.conv1, prefix, then_bn=layer.norm2, scratch=scratch,
                                            rounded=False)
    if bottleneck is None:
        return None
    return run_frozen_cpu_bn_act_conv(None, layer.conv2, bottleneck, rounded=False, dtype=bottleneck.dtype)


class _DenseBlockFunction(torch.autograd.Function):
    """DenseBlock forward/backward with the shared buffers. apply(block, x, *params)
    where params are _layer_params of each layer in order."""

    @staticmethod
    def forward(ctx, block: DenseBlock, x: torch.Tensor, *params: torch.Tensor | None) -> torch.Tensor:
        buf, records = _run_forward(block, x, params, keep=True)
        ctx.block = block
        ctx.flags = [(r[6], r[7], r[4] is not None, r[5] is not None) for r in records]
        ctx.drop_rates = [layer.drop_rate for layer in block.values()]
        kept = [t for r in records for t in r[:6] if t is not None]
        ctx.save_for_backward(buf, *params, *kept)
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        block = ctx.block
        buf, *saved = ctx.saved_tensors
        n_params = _PARAMS_PER_LAYER * len(ctx.flags)
        params, kept = saved[:n_params], iter(saved[n_params:])
        needs_param = ctx.needs_input_grad[2:]
        k = block.growth_rate
        fmt = _buffer_format(buf)
        grad_buf = torch.empty_like(buf, memory_format=fmt)
        grad_buf.copy_(grad_out)
        per_layer = []
        for flags in ctx.flags:
            stats = [next(kept) for _ in range(_STATS_PER_LAYER)]
            mask = next(kept) if flags[2] else None
            bottleneck = next(kept) if flags[3] else None
            per_layer.append((stats, mask, bottleneck))
        param_grads: list[torch.Tensor | None] = [None] * n_params
        scratch = None
        layers = list(block.values())
        for i in reversed(range(len(layers))):
            (_, conv1), (_, conv2) = layers[i].units()
            training1, training2 = ctx.flags[i][:2]
            (mean1, var1, mean2, var2), mask, bottleneck = per_layer[i]
            bn_w1, bn_b1, w1, b1, bn_w2, bn_b2, w2, b2 = params[_PARAMS_PER_LAYER * i:_PARAMS_PER_LAYER * (i + 1)]
            wanted = needs_param[_PARAMS_PER_LAYER * i:_PARAMS_PER_LAYER * (i + 1)]
            c = block.num_input_features + i * k
            prefix = buf[:, :c]
            grad_new = grad_buf[:, c:c + k]
            if mask is not None:
                grad_new = torch.ops.aten.native_dropout_backward(grad_new, mask, 1.0 / (1.0 - ctx.drop_rates[i]))
            if bottleneck is None:
                if scratch is None:
                    scratch = torch.empty((buf.shape[0], w1.shape[0], buf.shape[2], buf.shape[3]), dtype=buf.dtype,
                                          device=buf.device, memory_format=fmt)
                # The saved statistics as "running" statistics reproduce the forward's normalisation.
                torch.ops.cnnkernels.bn_act_conv_into(scratch, prefix, w1, b1, bn_w1, bn_b1, mean1, var1,
                                                      *_conv_args(conv1), False, layers[i].norm1.eps, "relu")
                bottleneck = scratch
            grads2 = torch.ops.cnnkernels.bn_act_conv_backward(
                grad_new, bottleneck, w2, b2, bn_w2, bn_b2, mean2, var2, *_conv_args(conv2), training2,
                layers[i].norm2.eps, "relu", [True, wanted[6], wanted[7], wanted[4], wanted[5]])
            need_x = i > 0 or ctx.needs_input_grad[1]
            grads1 = torch.ops.cnnkernels.bn_act_conv_backward(
                grads2[0], prefix, w1, b1, bn_w1, bn_b1, mean1, var1, *_conv_args(conv1), training1,
                layers[i].norm1.eps, "relu", [need_x, wanted[2], wanted[3], wanted[0], wanted[1]])
            if need_x:
                grad_buf[:, :c].add_(grads1[0])
            # The op returns grads of (x, weight, bias, bn_weight, bn_bias); a unit's params
            # are ordered (bn_weight, bn_bias, weight, bias).
            for offset, grads in ((0, grads1), (4, grads2)):
                for slot, index in enumerate((3, 4, 1, 2)):
                    if wanted[offset + slot]:
                        j = _PARAMS_PER_LAYER * i + offset + slot
                        param_grads[j] = grads[index].to(params[j].dtype)
            del grads1, grads2, bottleneck
        grad_x = grad_buf[:, :block.num_input_features] if ctx.needs_input_grad[1] else None
        return (None, grad_x, *param_grads)
