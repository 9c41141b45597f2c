"""Builds a CUDA-emulation harness (tests/cuda_emulation/<op>_harness.cpp, which includes
the op's csrc/cuda/<op>_kernels.cuh, csrc/emulation/cuda_host_emulation.h and
harness_common.h) with g++ into a shared library and loads it with ctypes.

The library is cached under the temp dir, keyed by the hash of the compiler, its flags,
the harness and every header it may include (csrc/cuda/*.cuh, csrc/common/*.h, the
emulation and harness headers), and written atomically (concurrent test runs never load
half a file).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import skip_or_fail
import torch

ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = Path(__file__).resolve().parent
EMULATION_HEADER = ROOT / "csrc" / "emulation" / "cuda_host_emulation.h"
HARNESS_HEADER = HARNESS_DIR / "harness_common.h"  # included by every harness
FLAGS = ["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC"]
SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}


def _headers() -> list[Path]:
    """Every header a harness may include, directly or through another."""
    csrc = ROOT / "csrc"
    return [EMULATION_HEADER, HARNESS_HEADER, *sorted(csrc.glob("cuda/*.cuh")), *sorted(csrc.glob("common/*.h"))]


def build(harness: str | Path) -> Path:
    """The path of the built library of `harness` (a path, or a file name in this folder);
    skips the test when g++ is missing (fails it under CNNKERNELS_REQUIRE_EXTENSION=1)."""
    harness = HARNESS_DIR / harness
    gxx = shutil.which("g++")
    if gxx is None:
        skip_or_fail("g++ not found: cannot build the CUDA host emulation harness")
    digest = hashlib.sha256(" ".join([gxx, *FLAGS]).encode())
    for source in [*_headers(), harness]:
        digest.update(source.read_bytes())
    cache = Path(tempfile.gettempdir()) / "cnnkernels_cuda_emulation" / digest.hexdigest()[:16]
    library = cache / f"{harness.stem}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"build-{os.getpid()}.so"
        result = subprocess.run(
            [gxx, *FLAGS, f"-I{ROOT / 'csrc'}", str(harness), "-o", str(partial)],
            capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"g++ could not build the emulation harness {harness.name}:\n{result.stderr}")
        os.replace(partial, library)
    return library


def load(harness: str | Path, signatures: dict[str, list]) -> ctypes.CDLL:
    """Builds and loads the harness; every `<name>_f32` / `<name>_f64` entry point of
    `signatures` gets its argtypes and an int return (0 = success)."""
    handle = ctypes.CDLL(str(build(harness)))
    for name, argtypes in signatures.items():
        for suffix in SUFFIXES.values():
            fn = getattr(handle, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return handle


def call(lib: ctypes.CDLL, name: str, dtype: torch.dtype, *args) -> None:
    """Calls `<name>_<f32|f64>` with tensors passed as data pointers (None as null)."""
    converted = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    assert getattr(lib, f"{name}_{SUFFIXES[dtype]}")(*converted) == 0, f"{name}: launch refused"
