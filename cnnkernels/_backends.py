"""Which implementation of an op runs, and why the others did not.

Every op has up to four implementations: reference (plain torch), cpu (C++), triton
and cuda (CUDA C++). Each states, for a given input, the reasons it cannot run it
(xformers style). Default order: cuda, triton, reference for CUDA tensors; cpu,
reference for CPU tensors. `CNNKERNELS_BACKEND=<name>` or `use_backend("<name>")`
forces one; a forced backend that cannot take the input raises BackendError with its
reasons. Forcing "triton" on CPU tensors runs the Triton kernels in Triton's
interpreter, which is how the tests reach them without a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator

BACKENDS = ("reference", "cpu", "triton", "cuda")
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "CNNKERNELS_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("cnnkernels_backend", default=None)


class BackendError(RuntimeError):
    """A forced backend cannot run the given input, or the backend name is unknown."""


@dataclass(frozen=True)
class Implementation:
    backend: str
    kernel: str  # what runs, for explain() and cnnkernels.info
    run: Callable
    reasons: Callable[..., list[str]]  # same arguments as run; empty list = can run
    describe: Callable[..., str] | None = None  # same arguments as run; the kernel picked for them

    def kernel_for(self, args) -> str:
        """The kernel this implementation runs for args (backends that pick one by shape say which)."""
        return self.describe(*args) if self.describe is not None else self.kernel


_registry: dict[str, dict[str, Implementation]] = {}


def register(op_name: str, implementation: Implementation) -> None:
    if implementation.backend not in BACKENDS:
        raise ValueError(f"unknown backend {implementation.backend!r}")
    _registry.setdefault(op_name, {})[implementation.backend] = implementation


def implementations(op_name: str) -> dict[str, Implementation]:
    return dict(_registry[op_name])


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} from {source}; choose one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by use_backend() (innermost wins) or else by CNNKERNELS_BACKEND."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, f"${ENV_VAR}") if env else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every cnnkernels op inside the block onto backend `name` (None: default choice)."""
    if name is not None:
        _check_name(name, "use_backend()")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _device_type(args) -> str:
    for arg in args:
        device = getattr(arg, "device", None)
        if device is not None:
            return device.type
    return "cpu"


def candidates(op_name: str, args) -> tuple[str, ...]:
    forced = forced_backend()
    if forced is not None:
        return (forced,)
    return DEFAULT_ORDER.get(_device_type(args), ("reference",))


def reasons_for(op_name: str, backend: str, args) -> list[str]:
    implementation = _registry[op_name].get(backend)
    if implementation is None:
        return [f"{op_name} has no {backend} implementation"]
    return implementation.reasons(*args)


def select(op_name: str, args) -> Implementation:
    """The implementation that runs op_name on args; BackendError if none can."""
    rejected = {}
    for backend in candidates(op_name, args):
        reasons = reasons_for(op_name, backend, args)
        if not reasons:
            return _registry[op_name][backend]
        rejected[backend] = reasons
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in rejected.items())
    raise BackendError(f"no backend can run cnnkernels.{op_name} on this input ({detail})")


def explain(op_name: str, args) -> dict:
    """{'backend', 'kernel', 'forced', 'rejected': {backend: reasons}} for op_name on args."""
    forced = forced_backend()
    rejected = {name: reasons_for(op_name, name, args) for name in BACKENDS}
    rejected = {name: reasons for name, reasons in rejected.items() if reasons}
    try:
        chosen = select(op_name, args)
        backend, kernel = chosen.backend, chosen.kernel_for(args)
    except BackendError:
        backend = kernel = None
    return {"op": op_name, "backend": backend, "kernel": kernel, "forced": forced, "rejected": rejected}
