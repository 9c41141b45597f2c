"""cnnkernels.ops.add_act: residual add + activation, fused.

The registered ops (schemas in csrc/registration.cpp):
  cnnkernels::add_act           forward, returns out = act(x + residual)
  cnnkernels::add_act_backward  grad = grad_out * (out > 0) (relu) / grad_out (none)
Both get their CPU and CUDA kernels here; each kernel picks a backend per call
(cnnkernels/_backends.py). Fake implementations and autograd are registered here too,
so torch.compile(fullgraph=True) traces the op without a graph break.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from cnnkernels import _backends, _library, reference
from cnnkernels._backends import Implementation
from cnnkernels.ops import _checks

OP = "add_act"
BACKWARD_OP = "add_act_backward"


def add_act(x, residual, *, activation="relu"):
    """act(x + residual) in one pass, as at the end of a ResNet block.

    Shapes: x and residual have one shape (typically [N, C, H, W]; any ndim >= 1 is
    accepted), one floating dtype (float32, float64, float16, bfloat16) and one device;
    their strides may differ. Returns a new tensor of that shape and dtype in x's
    memory format: channels_last when a 4-D x is channels-last (and not contiguous),
    contiguous otherwise (a residual in another layout is read through a copy).

    activation is "relu" or "none". The sum is formed in float32 (float64 for float64)
    and rounded once. Gradients flow to x and residual: both get
    grad_out * (out > 0) for relu, grad_out for none. Which backend runs is explained by
    ``cnnkernels.ops.explain("add_act", x, residual)``.
    """
    return torch.ops.cnnkernels.add_act(*_normalize(x, residual, activation))


def _normalize(x, residual, activation) -> tuple:
    """Checks every argument and returns them in the schema's order and types."""
    _checks.check_activation(activation, reference.ACTIVATIONS)
    _checks.check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-D tensor")
    _checks.check_tensor(residual, "residual")
    _checks.check_like(residual, "residual", x)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return (x, residual, activation)


def _normalize_call(*args, **kwargs) -> tuple:
    """The schema's arguments for a call written like add_act(*args, **kwargs)."""
    bound = inspect.signature(add_act).bind(*args, **kwargs)
    bound.apply_defaults()
    return _normalize(*bound.arguments.values())


# --- backends -----------------------------------------------------------------------

def _native_reasons(device_type: str, dispatch_key: str):
    def reasons(first, *_):
        found = []
        if first.device.type != device_type:
            found.append(f"needs {device_type} tensors, got {first.device.type}")
        if not _library.extension_loaded():
            found.append(f"cnnkernels._C is not loaded ({_library.LOAD_ERROR})")
        elif not _library.has_native_kernel(f"_{OP}_forward_native", dispatch_key):
            found.append(f"cnnkernels._C was built without {dispatch_key} kernels of {OP}")
        return found
    return reasons


def _triton_module():
    return importlib.import_module("cnnkernels.triton.add_act")


def _triton_reasons(*args):
    try:
        module = _triton_module()
    except ImportError as error:
        return [f"triton is unavailable ({error})"]
    return module.unsupported_reasons(*args)


def _no_reasons(*_):
    return []


_backends.register(OP, Implementation("reference", "plain torch: add, relu", reference.add_act_forward, _no_reasons))
_backends.register(BACKWARD_OP, Implementation("reference", "plain torch: where(out > 0)",
                                               reference.add_act_backward, _no_reasons))
for _backend, _device, _key in (("cpu", "cpu", "CPU"), ("cuda", "cuda", "CUDA")):
    _backends.register(OP, Implementation(
        _backend, "one fused elementwise pass over x and residual in the output's memory format",
        lambda *a: torch.ops.cnnkernels._add_act_forward_native(*a), _native_reasons(_device, _key)))
    _backends.register(BACKWARD_OP, Implementation(
        _backend, "one elementwise pass: grad_out masked by out > 0",
        lambda *a: torch.ops.cnnkernels._add_act_backward_native(*a), _native_reasons(_device, _key)))
_backends.register(OP, Implementation(
    "triton", "flat elementwise Triton kernel over dense tensors in the output's memory format",
    lambda *a: _triton_module().forward(*a), _triton_reasons))
_backends.register(BACKWARD_OP, Implementation(
    "triton", "flat elementwise Triton kernel: grad_out masked by out > 0",
    lambda *a: _triton_module().backward(*a), _triton_reasons))


# --- dispatcher registrations ---------------------------------------------------------

@torch.library.register_kernel(f"cnnkernels::{OP}", ("cpu", "cuda"))
def _forward_kernel(*args):
    return _backends.select(OP, args).run(*args)


@torch.library.register_kernel(f"cnnkernels::{BACKWARD_OP}", ("cpu", "cuda"))
def _backward_kernel(*args):
    return _backends.select(BACKWARD_OP, args).run(*args)


@torch.library.register_fake(f"cnnkernels::{OP}")
def _forward_fake(x, residual, activation):
    return torch.empty_like(x, memory_format=reference.output_memory_format(x))


@torch.library.register_fake(f"cnnkernels::{BACKWARD_OP}")
def _backward_fake(grad_out, out, activation):
    return torch.empty_like(out, memory_format=reference.output_memory_format(out))


def _setup_context(ctx, inputs, output):
    ctx.activation = inputs[2]
    ctx.save_for_backward(output if ctx.activation == "relu" else None)


def _backward(ctx, grad_out):
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None
    if ctx.activation == "relu":
        (out,) = ctx.saved_tensors
        grad = torch.ops.cnnkernels.add_act_backward(grad_out, out, ctx.activation)
    else:
        grad = grad_out  # the identity: no kernel, no copy (as aten's add backward)
    return (grad if ctx.needs_input_grad[0] else None, grad if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd(f"cnnkernels::{OP}", _backward, setup_context=_setup_context)
