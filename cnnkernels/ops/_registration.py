"""Backend registration shared by the op files (cnnkernels/ops/<op>.py).

Each registered op (a forward, its backward, an out= variant) gets four implementations
in cnnkernels/_backends.py — reference (plain torch), cpu and cuda (the C++ kernel
torch.ops.cnnkernels.<native_op>, taken from the compiled extension cnnkernels._C) and
triton (a function of the op's Triton module, imported on first use) — and one
dispatcher kernel for cpu and cuda that runs the implementation _backends.select picks.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from cnnkernels import _backends, _cost, _library
from cnnkernels._backends import Implementation
from cnnkernels.ops import _autocast

_NATIVE = (("cpu", "CPU", "csrc/cpu/{}.cpp"), ("cuda", "CUDA", "csrc/cuda/{}.cu"))  # backend = device type


@dataclass(frozen=True)
class PublicCall:
    """How users call a registered op, and what a call costs.

    normalize(*args, **kwargs): the op's Python signature checked and turned into the
    schema's arguments (what every backend takes); sample(device) -> (args, kwargs): one
    small float32 call, for `python -m cnnkernels.info`; cost(values, result) -> OpCost:
    one call of the registered op ({schema argument name: value}, its result) as
    cnnkernels.analysis counts it; traffic(...) -> Traffic: the op's passes over memory
    from shapes, fused and unfused, for cnnkernels.bench.traffic (cnnkernels/_cost.py)."""
    normalize: Callable[..., tuple]
    sample: Callable[[str], tuple[tuple, dict]]
    cost: Callable[[dict, object], _cost.OpCost] | None = None
    traffic: Callable[..., _cost.Traffic] | None = None


PUBLIC_CALLS: dict[str, PublicCall] = {}
"""Every op a user calls (the backward ops run inside autograd), by name; explain(), info,
analysis and the bench's traffic tables read it."""


def declare_call(op_name: str, normalize: Callable[..., tuple], sample: Callable[[str], tuple[tuple, dict]], *,
                 cost: Callable[[dict, object], _cost.OpCost] | None = None,
                 traffic: Callable[..., _cost.Traffic] | None = None) -> None:
    PUBLIC_CALLS[op_name] = PublicCall(normalize, sample, cost, traffic)


def bind(function: Callable, args: tuple, kwargs: dict, drop: tuple[str, ...] = ()) -> list:
    """The values of `function`'s parameters for the call function(*args, **kwargs), in
    signature order with defaults applied, leaving out the names in `drop`."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return [value for name, value in bound.arguments.items() if name not in drop]


def schema_values(op_name: str, args: tuple, kwargs: dict) -> dict:
    """{schema argument name: value} of a call torch.ops.cnnkernels.<op_name>(*args, **kwargs)."""
    names = [a.name for a in getattr(torch.ops.cnnkernels, op_name).default._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def no_reasons(*_) -> list[str]:
    return []


def native_reasons(family: str, native_op: str, device_type: str, x_index: int = 0) -> Callable[..., list[str]]:
    """Why torch.ops.cnnkernels.<native_op> (one of op `family`'s C++ kernels, built from
    csrc/<cpu|cuda>/<family>) cannot run for device_type; the device is that of argument x_index."""
    dispatch_key, source = next((key, source.format(family)) for device, key, source in _NATIVE
                                if device == device_type)

    @functools.cache  # asked once: the extension is loaded (or not) at import
    def build_reasons() -> list[str]:
        if not _library.extension_loaded():
            return [f"cnnkernels._C is not loaded ({_library.LOAD_ERROR})"]
        if not hasattr(torch.ops.cnnkernels, native_op):
            return [f"cnnkernels._C predates {family}: rebuild it"]
        if not _library.has_native_kernel(native_op, dispatch_key):
            return [f"cnnkernels._C was built without {dispatch_key} kernels of {family} ({source})"]
        return []

    def reasons(*args):
        x = args[x_index]
        found = [] if x.device.type == device_type else [f"needs {device_type} tensors, got {x.device.type}"]
        return found + build_reasons()
    return reasons


class TritonModule:
    """An op's Triton module (cnnkernels.triton.<op>), imported on first use: triton may be missing."""

    def __init__(self, name: str):
        self.name = name

    def module(self):
        return importlib.import_module(self.name)

    def reasons(self, *args) -> list[str]:
        """The module's unsupported_reasons(*args), or why triton cannot be imported."""
        return self.reasons_from("unsupported_reasons")(*args)

    def reasons_from(self, name: str) -> Callable[..., list[str]]:
        """Like reasons, through the module's function `name` (the checks of an op's other
        entry points, e.g. its backward's), imported at the first call."""
        def reasons(*args) -> list[str]:
            try:
                module = self.module()
            except ImportError as error:
                return [f"triton is unavailable ({error})"]
            return getattr(module, name)(*args)
        return reasons

    def function(self, name: str) -> Callable:
        """Calls the module's function `name`, importing the module at the first call."""
        return lambda *args: getattr(self.module(), name)(*args)


def register(op_name: str, *, family: str, x_index: int = 0,
             reference: tuple[str, Callable],
             native: tuple[str | dict[str, str], str],
             triton: tuple[str, Callable, Callable[..., list[str]]],
             native_describe: dict[str, Callable[..., str]] | None = None,
             triton_describe: Callable[..., str] | None = None) -> None:
    """Registers the four implementations of cnnkernels::<op_name> and its cpu/cuda dispatcher kernel.

    reference = (kernel description, function); native = (kernel description, the same for
    cpu and cuda or one per backend, name of the native op); triton = (kernel description,
    function, reasons). All functions and reasons take the op's schema arguments; x_index
    is the argument whose device the native backends check. native_describe (per backend)
    and triton_describe name the kernel picked for an input, for ops that pick by shape.
    """
    reference_kernel, reference_run = reference
    _backends.register(op_name, Implementation("reference", reference_kernel, reference_run, no_reasons))
    native_kernel, native_op = native
    for backend, _, _ in _NATIVE:
        _backends.register(op_name, Implementation(
            backend, native_kernel if isinstance(native_kernel, str) else native_kernel[backend],
            lambda *args: getattr(torch.ops.cnnkernels, native_op)(*args),
            native_reasons(family, native_op, backend, x_index),
            (native_describe or {}).get(backend)))
    triton_kernel, triton_run, triton_reasons = triton
    _backends.register(op_name, Implementation("triton", triton_kernel, triton_run, triton_reasons, triton_describe))

    @torch.library.register_kernel(f"cnnkernels::{op_name}", ("cpu", "cuda"))
    def _kernel(*args):
        implementation = _backends.select(op_name, args)
        if not _autocast.enabled():
            return implementation.run(*args)
        with _autocast.suspended():  # the op's dtypes were settled by its Python front (ops/_autocast.py)
            return implementation.run(*args)
