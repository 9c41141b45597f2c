"""Run one Triton kernel source compiled on CUDA tensors and interpreted on CPU tensors.

Triton 3.8 picks interpreter or compiler once, when ``@triton.jit`` runs (env
``TRITON_INTERPRET``), and the helpers inside ``triton.language`` (``tl.zeros``,
``tl.cdiv``, ...) are ``JITFunction`` objects that refuse to be called outside a
compiled kernel. :func:`kernel` keeps the raw Python function and builds both forms:

- ``k.jit``: what ``triton.jit`` returns (a ``JITFunction``, compiled for CUDA tensors;
  an ``InterpretedFunction`` if the process set ``TRITON_INTERPRET=1``);
- for CPU tensors, a ``triton.runtime.interpreter.InterpretedFunction`` made lazily from
  the same function and run inside :func:`_interpreter_scope`, which for the duration
  of the launch lets ``JITFunction`` device calls run through the interpreter too,
  and undoes every patch afterwards so that later GPU compiles in the same process
  see an untouched ``triton.language``. The scope also fixes the stock interpreter's
  ``tl.dot`` on bfloat16 operands (it multiplies their raw bits as integers) by widening
  them to float32 first, which is exact, and turns off the interpreter's int32
  overflow sanitizer (it checks every integer op through int64 and makes the
  interpreter about 2.5x slower; the kernels compute offsets in int64 where
  they can exceed int32, and _support.index_reasons turns away the tensors that
  would overflow the rest). It also makes ``tl.tensor.__index__`` read a scalar's
  one-element array through ``.squeeze()``, as Triton 3.8's interpreter does: Triton
  3.6's calls ``int()`` on the shape-(1,) array, which NumPy 2.4 refuses ("only
  0-dimensional arrays can be converted to Python scalars"), so every
  ``range(0, C, BLOCK)`` over a runtime int failed there.

Launch as usual: ``k[grid](*args, **constexprs)``; the first tensor argument decides.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import triton
import triton.language as tl
from triton.runtime import interpreter as _interp
from triton.runtime.jit import JITFunction

_lock = threading.RLock()
_device_functions: dict = {}  # raw function -> InterpretedFunction, for device calls


def _interpreted_device_call(self: JITFunction, *args, **kwargs):
    # What InterpretedFunction.__call__ does, except that the language patches are
    # scoped to this call (the stock version leaves them in place).
    function = _device_functions.get(self.fn)
    if function is None:
        function = _device_functions[self.fn] = _interp.InterpretedFunction(self.fn)
    scope = _interp._patch_lang(self.fn)
    try:
        return function.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


def _as_float32(handle):
    # The interpreter keeps bfloat16 as raw uint16 bits; widen them exactly.
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << np.uint32(16)
    return _interp.TensorHandle(bits.view(np.float32), tl.float32)


def _create_dot(a, b, d, input_precision, max_num_imprecise_acc):
    # The stock interpreter multiplies bfloat16 operands as uint16 integers.
    return _stock_create_dot(_as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)


_stock_create_dot = _interp.interpreter_builder.create_dot
_stock_patch_lang_tensor = _interp._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    # Triton <= 3.6 sets __index__ to int(self.handle.data), a shape-(1,) array for a
    # scalar, which NumPy >= 2.4 refuses to convert; 3.8 squeezes it first. Same value.
    _stock_patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


@contextlib.contextmanager
def _interpreter_scope():
    builder = _interp.interpreter_builder
    with _lock:
        original = JITFunction.__call__
        options = builder.options
        JITFunction.__call__ = _interpreted_device_call
        builder.create_dot = _create_dot
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
        _interp._patch_lang_tensor = _patch_lang_tensor  # looked up by _interp._patch_lang
        try:
            yield
        finally:
            _interp._patch_lang_tensor = _stock_patch_lang_tensor
            builder.options = options
            del builder.create_dot
            JITFunction.__call__ = original


class DualKernel:
    """A Triton kernel launched compiled on CUDA tensors and interpreted on CPU ones."""

    def __init__(self, fn):
        self.fn = fn
        self.jit = triton.jit(fn)
        self._interpreted = None
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def interpreted(self) -> _interp.InterpretedFunction:
        if self._interpreted is None:
            self._interpreted = _interp.InterpretedFunction(self.fn)
        return self._interpreted

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            device = next(a.device for a in (*args, *kwargs.values()) if hasattr(a, "data_ptr"))
            if device.type == "cuda":
                return self.jit[grid](*args, **kwargs)
            with _interpreter_scope():
                return self.interpreted()[grid](*args, **kwargs)

        return launch


def kernel(fn) -> DualKernel:
    """Decorator used in place of ``@triton.jit`` by the kernels of this package."""
    return DualKernel(fn)
