"""Compiles a translation unit of torch-free CUDA kernels (csrc/cuda/*_kernels.cuh) with
nvcc, as the package build would (torch's nvcc flags, -O3), and reads ptxas's report:
the compile tests of every op use it to fail on errors, warnings, register spills and
local-memory stack frames, and to report registers per kernel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]

# What torch.utils.cpp_extension passes to nvcc for every CUDA source.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

# Instantiates a translation unit's INSTANTIATE(T, A) macro for every data type the
# package dispatches to (T) with its accumulation type (A).
EVERY_DTYPE = """
INSTANTIATE(float, float)
INSTANTIATE(double, double)
INSTANTIATE(__half, float)
INSTANTIATE(__nv_bfloat16, float)
"""

# bn_cuda::backward_reduce_finalize_kernel for both accumulation types (conv_bn_act and
# bn_act_conv launch it).
BN_FINALIZE = """
template __global__ void cnnkernels::bn_cuda::backward_reduce_finalize_kernel<float>(
    const float*, const float*, int64_t, int, float*, float*);
template __global__ void cnnkernels::bn_cuda::backward_reduce_finalize_kernel<double>(
    const double*, const double*, int64_t, int, double*, double*);
"""

# The architectures and C++ standards checked: the package builds with C++20 (torch
# 2.14's headers need it); the kernel headers also stay C++17.
ARCH_STD = [("sm_80", "c++17"), ("sm_90", "c++20")]


def nvcc_path() -> str:
    """nvcc from PATH or CUDA_HOME; skips the test when there is none."""
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    skip_or_fail("nvcc not found (put it on PATH or set CUDA_HOME)")


@dataclass(frozen=True)
class KernelResources:
    """ptxas's figures for one compiled kernel."""
    name: str  # demangled when c++filt is available
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    demangled = result.stdout.splitlines()
    return demangled if result.returncode == 0 and len(demangled) == len(names) else names


def parse_ptxas(stderr: str) -> list[KernelResources]:
    """The kernels of a `-Xptxas=-v` report, in order."""
    records, current = [], None
    for line in stderr.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = {"name": entry.group(1), "spill_stores": 0, "spill_loads": 0, "stack_frame": 0}
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.update(stack_frame=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            smem = re.search(r"(\d+) bytes smem", line)
            records.append(dict(current, registers=int(used.group(1)), shared_bytes=int(smem.group(1)) if smem else 0))
            current = None
    names = _demangle([r["name"] for r in records])
    return [KernelResources(**dict(r, name=n)) for r, n in zip(records, names)]


def compile_kernels(source: str, arch: str, std: str, tmp_path: Path) -> list[KernelResources]:
    """Compiles `source` (a .cu text including headers under csrc/) for arch with std;
    asserts success without warnings, a non-empty object, no register spills and no
    stack frames; returns ptxas's figures per kernel."""
    unit = tmp_path / "kernels.cu"
    unit.write_text(source)
    result = subprocess.run(
        [nvcc_path(), f"-std={std}", "-O3", f"-arch={arch}", *TORCH_NVCC_FLAGS, "-Xptxas=-v",
         "-Werror=all-warnings", f"-I{ROOT / 'csrc'}", "-c", str(unit), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed for {arch}:\n{result.stderr}"
    assert (tmp_path / "kernels.o").stat().st_size > 0
    kernels = parse_ptxas(result.stderr)
    assert kernels, f"ptxas reported no kernels for {arch}:\n{result.stderr}"
    spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
    assert not spilling, f"register spills for {arch}: {spilling}"
    stacks = [k for k in kernels if k.stack_frame]
    assert not stacks, f"stack frames for {arch}: {stacks}"
    return kernels
