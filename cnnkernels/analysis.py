"""Per-layer cost tables of a network, as the lecture notes compute them by hand.

    from cnnkernels.analysis import summary
    table = summary(models.create_model("alexnet"), (3, 227, 227))
    print(table)            # aligned table, one row per layer, totals at the bottom
    table.rows[0]           # LayerRow(name='features.0', kind='conv+relu', output_shape=(64, 56, 56),
                            #          memory_kb=784.0, params=23296, flops=72855552, ...)

How it works: the model runs once in eval mode under torch.no_grad() inside a
TorchFunctionMode that records every costed torch call (conv2d, linear, batch_norm,
activations, pools, cat, tensor add/mul, flatten, local_response_norm) and every call of
a fused cnnkernels op (each costed by the cost model declared with the op,
cnnkernels/ops/<op>.py), with module hooks telling which module runs. Since
the calls are recorded rather than the modules, a layer counts the same whether it runs
as separate modules, as torchvision's functional code or as a fused op (ConvBNAct,
FusedSequential, conv_bn_act_modules in a residual block).

Rows. A conv or linear call opens a row; the elementwise calls that are the only
readers of its output (BatchNorm, activation, residual add, dropout) join it as its
epilogue, so conv -> bn -> relu is one row of kind "conv+bn+relu" (the notes likewise
fold ReLU into the conv row) and a residual block's last conv is "conv+bn+add+relu".
BatchNorm and activation calls that are not an epilogue and feed a conv (as its only
reader) join that conv as its prologue ("bn+relu+conv": DenseNet's pre-activation
units; the epilogue rule comes first, so a dense layer reads "bn+relu+conv+bn+relu",
then "conv"). Every other recorded call is a row of its own. Dropout in eval mode (the
identity) is left out. A row is named after the module of its conv / linear / bn
weight, or after the module running a weightless call ("inception3a:cat").

Conventions (the notes'):
  output_shape  the row's final output per sample, (C, H, W) or (features,).
  memory_kb     output elements x bytes per element / 1024, for the whole batch.
  params        learnable parameters the row uses (weights + biases, BatchNorm's gamma and
                beta; running statistics are buffers, not parameters), each counted once.
  flops         multiply-adds: conv C_out*H'*W'*(C_in/groups)*kH*kW per sample, linear
                C_in*C_out per sample, BatchNorm one per element (scale and shift), pooling
                window size per output element (the notes' pool formula), LRN `size` per
                element, a tensor-by-tensor multiply (SE's channel scale) one per element,
                a fused SE gate its pool, two FCs and scale; activations, adds,
                concatenation and flatten count 0.
  bytes_unfused every call run as its own kernel: each reads its inputs (and weights,
                BatchNorm's 4 per-channel vectors) from memory and writes its output.
  bytes_fused   the row as one kernel: reads the row's external inputs and weights once
                and writes its final output once (intermediates stay on chip).
Flatten is a view and moves 0 bytes. All numbers cover the whole batch (batch_size=1 by
default, the notes' tables).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnkernels._cost import OpCost, nbytes
from cnnkernels.ops._registration import PUBLIC_CALLS, schema_values

__all__ = ["LayerRow", "Summary", "summary"]

_ACTIVATIONS = {"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "silu", "gelu", "hardswish", "hardsigmoid",
                "tanh", "leaky_relu", "elu"}
_POOLS = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
          "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"}
_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_MULS = {"mul", "mul_", "__mul__", "__imul__", "__rmul__"}
_EPILOGUE = {"bn", "relu", "sigmoid", "silu", "gelu", "hardswish", "hardsigmoid", "tanh", "relu6",
             "leaky_relu", "elu", "add", "dropout"}
_PROLOGUE = {"bn", "relu", "relu6", "silu", "gelu", "hardswish", "leaky_relu", "elu"}
_HEADS = {"conv", "linear"}


@dataclass
class LayerRow:
    """One layer of the table (see the module docstring for every column's convention)."""
    name: str
    kind: str
    output_shape: tuple[int, ...]
    memory_kb: float
    params: int
    flops: int
    bytes_unfused: int
    bytes_fused: int


_TOTALLED = ("params", "flops", "memory_kb", "bytes_unfused", "bytes_fused")


def _column_total(column: str, doc: str) -> property:
    return property(lambda self: sum(getattr(row, column) for row in self.rows), doc=doc)


@dataclass
class Summary:
    """summary()'s result: rows in execution order, and totals over them.
    str(summary) is an aligned table with a totals line."""
    rows: list[LayerRow]
    input_size: tuple[int, ...]
    batch_size: int

    total_params = _column_total("params", "Learnable parameters used by the forward pass, each counted once.")
    total_flops = _column_total("flops", "Multiply-adds of all rows.")
    total_memory_kb = _column_total("memory_kb", "Output memory of all rows, KB (the notes' activation memory).")
    total_bytes_unfused = _column_total("bytes_unfused", "Bytes moved with every call as its own kernel.")
    total_bytes_fused = _column_total("bytes_fused", "Bytes moved with every row as one kernel.")

    @property
    def totals(self) -> dict:
        """{"params", "flops", "memory_kb", "bytes_unfused", "bytes_fused"} summed over the rows."""
        return {column: getattr(self, f"total_{column}") for column in _TOTALLED}

    def __getitem__(self, name: str) -> LayerRow:
        """The first row called `name`."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}")

    def __str__(self) -> str:
        header = ("layer", "kind", "output (C,H,W)", "memory KB", "params", "flops", "KB moved unfused",
                  "KB moved fused")
        lines = [(r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.memory_kb:,.1f}", f"{r.params:,}",
                  f"{r.flops:,}", f"{r.bytes_unfused / 1024:,.1f}", f"{r.bytes_fused / 1024:,.1f}")
                 for r in self.rows]
        t = self.totals
        total = ("total", "", "", f"{t['memory_kb']:,.1f}", f"{t['params']:,}", f"{t['flops']:,}",
                 f"{t['bytes_unfused'] / 1024:,.1f}", f"{t['bytes_fused'] / 1024:,.1f}")
        widths = [max(len(line[i]) for line in [header, total, *lines]) for i in range(len(header))]

        def fmt(line):
            left = [line[i].ljust(widths[i]) for i in range(3)]
            right = [line[i].rjust(widths[i]) for i in range(3, len(line))]
            return "  ".join(left + right).rstrip()
        rule = "-" * len(fmt(header))
        title = f"input {self.batch_size}x{'x'.join(map(str, self.input_size))}"
        return "\n".join([title, fmt(header), rule, *map(fmt, lines), rule, fmt(total)])

    __repr__ = __str__


# --- recording ------------------------------------------------------------------------------

@dataclass
class _Row:
    name: str
    kinds: list[str]
    out: torch.Tensor
    input_bytes: int
    weight_bytes: int
    bytes_unfused: int
    flops: int
    params: int = 0
    view: bool = False


def _key(t: torch.Tensor) -> tuple[int, int]:
    """Identifies a parameter or buffer, and the views of it a fused op makes (a 1x1 conv
    weight flattened to a matrix has the same data pointer and size)."""
    return t.data_ptr(), t.numel()


def _arg(args, kwargs, index, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _func_name(func) -> str:
    qualified = getattr(func, "_qualified_op_name", None)  # OpOverloadPacket
    if qualified is None and hasattr(func, "_schema"):       # OpOverload
        qualified = func._schema.name
    return qualified if qualified is not None else getattr(func, "__name__", "")


def _event(func, args, kwargs, out) -> Optional[OpCost]:
    """The costed call `func(*args, **kwargs) -> out`, or None for calls that are not costed."""
    name = _func_name(func)
    if name.startswith("cnnkernels::"):
        op = name.split("::", 1)[1]
        call = PUBLIC_CALLS.get(op)
        return call.cost(schema_values(op, args, kwargs), out) if call is not None and call.cost else None
    if not isinstance(out, torch.Tensor) and name not in _POOLS:
        return None
    first = _arg(args, kwargs, 0, "input")
    if isinstance(first, nn.Parameter):  # e.g. a weight reshaped for a fused op
        return None
    if name == "conv2d":
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        flops = out.numel() * weight[0].numel()
        return OpCost(["conv"], first, [], [weight, bias], out, flops, nbytes(first, weight, bias, out))
    if name == "linear":
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        flops = out.numel() * weight.shape[1]
        return OpCost(["linear"], first, [], [weight, bias], out, flops, nbytes(first, weight, bias, out))
    if name == "batch_norm":
        vectors = [_arg(args, kwargs, i, key) for i, key in ((1, "running_mean"), (2, "running_var"),
                                                            (3, "weight"), (4, "bias"))]
        return OpCost(["bn"], first, [], vectors, out, out.numel(), nbytes(first, out, *vectors))
    if name in _ACTIVATIONS:
        kind = name.rstrip("_")
        return OpCost([kind], first, [], [], out, 0, nbytes(first, out))
    if name in _POOLS:
        result = out[0] if isinstance(out, (tuple, list)) else out
        if name.startswith("adaptive"):
            flops, kind = first.numel(), "avgpool" if "avg" in name else "maxpool"
        else:
            kh, kw = _pair(_arg(args, kwargs, 1, "kernel_size"))
            flops, kind = result.numel() * kh * kw, "avgpool" if "avg" in name else "maxpool"
        return OpCost([kind], first, [], [], result, flops, nbytes(first, result))
    if name == "cat":
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        return OpCost(["cat"], None, tensors, [], out, 0, nbytes(*tensors, out))
    if name in _ADDS or name in _MULS:
        other = _arg(args, kwargs, 1, "other")
        if not (isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor) and other.dim() > 0):
            return None
        kind = "add" if name in _ADDS else "mul"
        return OpCost([kind], first, [other], [], out, out.numel() if kind == "mul" else 0,
                      nbytes(first, other, out))
    if name == "flatten":
        return OpCost(["flatten"], first, [], [], out, 0, 0, view=True)
    if name == "dropout":
        if out is first:
            return None
        return OpCost(["dropout"], first, [], [], out, 0, nbytes(first, out))
    if name == "local_response_norm":
        size = _arg(args, kwargs, 1, "size")
        return OpCost(["lrn"], first, [], [], out, out.numel() * size, nbytes(first, out))
    return None


class _Recorder(TorchFunctionMode):
    """Records costed calls, each tagged with the innermost module running."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.events: list[OpCost] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        event = _event(func, args, kwargs, out)
        if event is not None:
            event.module = self.stack[-1] if self.stack else ""
            self.events.append(event)
        return out


# --- rows -------------------------------------------------------------------------------------

def _row_name(event: OpCost, owners: dict[tuple[int, int], str], modules: dict[str, nn.Module],
              func_label: str) -> str:
    """The weight's module for conv/linear/bn calls; the running module itself when all its
    parameters belong to this call (ConvBNAct); the running module and the call otherwise."""
    weight_owners = [owners[_key(w)] for w in event.weights if isinstance(w, torch.Tensor) and _key(w) in owners]
    running = event.module
    if weight_owners:
        module = modules.get(running)
        if module is not None and running != weight_owners[0]:
            own = {_key(p) for p in module.parameters()}
            used = {_key(w) for w in event.weights if isinstance(w, torch.Tensor)}
            if own and own <= used:
                return running
        return weight_owners[0]
    module = modules.get(running)
    if module is not None and not any(True for _ in module.children()):
        return running or func_label
    return f"{running}:{func_label}" if running else func_label


def _new_row(event: OpCost, name: str) -> _Row:
    inputs = ([event.primary] if event.primary is not None else []) + event.extra
    return _Row(name, list(event.kinds), event.out, nbytes(*inputs), nbytes(*event.weights),
                event.bytes_unfused, event.flops, view=event.view)


def _absorb(row: _Row, event: OpCost) -> None:
    row.kinds += event.kinds
    row.out = event.out
    row.input_bytes += nbytes(*event.extra)
    row.weight_bytes += nbytes(*event.weights)
    row.bytes_unfused += event.bytes_unfused
    row.flops += event.flops


def _count_params(row: _Row, event: OpCost, seen: set, param_keys: set) -> None:
    for w in event.weights:
        if isinstance(w, torch.Tensor) and _key(w) in param_keys and _key(w) not in seen:
            seen.add(_key(w))
            row.params += w.numel()


def _build_rows(events: Sequence[OpCost], model: nn.Module) -> list[_Row]:
    modules = dict(model.named_modules())
    owners: dict[tuple[int, int], str] = {}
    for mod_name, module in modules.items():
        for p in module.parameters(recurse=False):
            owners.setdefault(_key(p), mod_name)
        for b in module.buffers(recurse=False):
            owners.setdefault(_key(b), mod_name)
    param_keys = {_key(p) for p in model.parameters()}
    seen: set = set()
    rows: list[_Row] = []
    producer: dict[int, int] = {}  # id(tensor) -> index of the row whose final output it is
    consumed: set[int] = set()     # rows whose output another row has read
    for event in events:
        target = None
        src = producer.get(id(event.primary)) if event.primary is not None else None
        if src is not None and src not in consumed:
            kinds = set(rows[src].kinds)
            if set(event.kinds) <= _EPILOGUE and (_HEADS & kinds or kinds <= _PROLOGUE):
                target = src
            elif event.kinds[0] in _HEADS and kinds <= _PROLOGUE:
                target = src
                rows[src].name = _row_name(event, owners, modules, event.kinds[0])
        reads = event.extra if target is not None else [event.primary, *event.extra]
        for tensor in reads:
            if tensor is not None and id(tensor) in producer:
                consumed.add(producer[id(tensor)])
        if target is None:
            rows.append(_new_row(event, _row_name(event, owners, modules, event.kinds[0])))
            target = len(rows) - 1
        else:
            _absorb(rows[target], event)
        _count_params(rows[target], event, seen, param_keys)
        producer[id(event.out)] = target
    return rows


def summary(model: nn.Module, input_size: Sequence[int], batch_size: int = 1,
            dtype: torch.dtype = torch.float32, device=None) -> Summary:
    """Runs `model` once on a random [batch_size, *input_size] input (input_size is
    (C, H, W), or (N, C, H, W) as torchinfo takes it, N then being the batch size) in
    eval mode without gradients and returns its per-layer Summary: name,
    kind, output_shape, memory_kb, params, flops, bytes_unfused, bytes_fused per row,
    plus totals (see the module docstring for the conventions). The model's training
    flag is restored afterwards; parameters and buffers are left untouched.
    For AlexNet at (3, 227, 227), the first row is features.0, conv+relu, (64, 56, 56),
    784 KB, 23,296 params, 72,855,552 flops, as in the notes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        input_size = tuple(operator.index(s) for s in input_size)
    except TypeError:
        raise TypeError(f"input_size must be a sequence of ints, (C, H, W) or (N, C, H, W), "
                        f"got {input_size!r}") from None
    if len(input_size) == 4:
        if batch_size not in (1, input_size[0]):
            raise ValueError(f"input_size {input_size} gives the batch size {input_size[0]}, but batch_size="
                             f"{batch_size} was passed too: give one of them")
        batch_size, input_size = input_size[0], input_size[1:]
    elif len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W) or (N, C, H, W), got {input_size}")
    if min(input_size) < 1 or batch_size < 1:
        raise ValueError(f"input_size and batch_size must be positive, got {input_size} and batch_size={batch_size}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else "cpu"
    x = torch.randn(batch_size, *input_size, dtype=dtype, device=device)
    stack: list[str] = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    handles = []
    for mod_name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(mod_name)))
        handles.append(module.register_forward_hook(leave))
    was_training = model.training
    recorder = _Recorder(stack)
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    rows = []
    for row in _build_rows(recorder.events, model):
        out = row.out
        fused = 0 if row.view else row.input_bytes + row.weight_bytes + nbytes(out)
        rows.append(LayerRow(row.name, "+".join(row.kinds), tuple(out.shape[1:]),
                             out.numel() * out.element_size() / 1024, row.params, row.flops,
                             row.bytes_unfused, fused))
    return Summary(rows, input_size, batch_size)
