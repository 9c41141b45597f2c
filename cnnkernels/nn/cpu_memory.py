"""Freed CPU memory kept for reuse: no page faults on every inference call.

torch's CPU allocator hands each tensor to glibc's malloc. With glibc's defaults, a freed
block of more than a few MB goes back to the kernel (unmapped, or trimmed off the top of
the heap), so the next activation of that size is mapped afresh and every 4 KiB page of it
faults on its first write, inside the convolution that writes it. A frozen ResNet-50 at
batch 8 takes about 13,000 such faults per forward (52 MB of fresh pages). OpenVINO and
similar engines plan one memory pool and take none.

retain_freed_cpu_memory() sets two glibc malloc parameters for the whole process, as the
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables would at start-up:
blocks below 32 MiB come from the heap, and up to `trim_threshold` bytes of freed heap
are kept for the next allocations instead of being returned to the kernel. The price is
that the process's resident memory stays at its peak (up to trim_threshold above what it
uses) rather than shrinking after each call. cnnkernels.nn.freeze calls it for models
with CPU parameters unless told not to.

Nothing is changed where the allocator is not glibc's, or where the user has chosen the
allocator's behaviour: a jemalloc / tcmalloc / mimalloc in LD_PRELOAD, MALLOC_*_
variables, or malloc tunables in GLIBC_TUNABLES.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["retain_freed_cpu_memory", "MMAP_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed M_MMAP_THRESHOLD on 64-bit Linux
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_INT_MAX = 2**31 - 1
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: int | None = None  # the trim threshold set, once applied


def _user_chose_allocator() -> str | None:
    """Why the user's own allocator settings stand, or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    for name in _USER_SETTINGS:
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc tunables"
    return None


def _libc():
    """glibc as a ctypes library, or None on another C library or system."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_cpu_memory(trim_threshold: int = 1 << 30) -> bool:
    """Keeps freed CPU memory in the process for reuse (module docstring). trim_threshold:
    the most freed bytes kept at the top of the heap (default 1 GiB), >= MMAP_THRESHOLD.
    Returns whether the settings are in force (now or from an earlier call); False where
    nothing was changed (not glibc, or the user's allocator settings stand)."""
    global _applied
    if (isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int)
            or not MMAP_THRESHOLD <= trim_threshold <= _INT_MAX):
        raise ValueError(f"trim_threshold must be an int in [MMAP_THRESHOLD = {MMAP_THRESHOLD}, {_INT_MAX}] "
                         f"(a C int), got {trim_threshold!r}")
    if _applied is not None and _applied >= trim_threshold:
        return True
    if _user_chose_allocator() is not None:
        return False
    libc = _libc()
    if libc is None:
        return False
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        return False
    _applied = trim_threshold
    return True
