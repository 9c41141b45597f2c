"""csrc/cuda/conv_bn_act_kernels.cuh compiles with nvcc for sm_80 and sm_90, every kernel
instantiated for float, double, __half and __nv_bfloat16, with the flags torch's build
uses (half conversions disabled). No torch headers, so this takes seconds; the full
csrc/cuda/conv_bn_act.cu is compiled by the package build. Also fails on register
spills and on local-memory stack use, which a memory-bound kernel should not need.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TRANSLATION_UNIT = r"""
#include "cuda/conv_bn_act_kernels.cuh"

namespace k = cnnkernels::conv_bn_act_cuda;

#define INSTANTIATE(T, A)                                                                  \
  template __global__ void k::batch_stats_partial_kernel<T, A>(const T*, k::Geometry, A*,  \
                                                              A*, int64_t*);               \
  template __global__ void k::batch_stats_finalize_kernel<T, A>(                           \
      const T*, k::Geometry, const A*, const A*, const int64_t*, int, A*, A*);             \
  template __global__ void k::scale_shift_act_kernel<T, A>(const T*, const A*, const A*,   \
                                                          const T*, k::Geometry, bool, T*); \
  template __global__ void k::backward_reduce_partial_kernel<T, A>(                        \
      const T*, const T*, const T*, const A*, const A*, k::Geometry, bool, A*, A*);         \
  template __global__ void k::backward_elementwise_kernel<T, A>(                           \
      const T*, const T*, const T*, const A*, const A*, const A*, const A*, k::Geometry,   \
      bool, T*, T*);

INSTANTIATE(float, float)
INSTANTIATE(double, double)
INSTANTIATE(__half, float)
INSTANTIATE(__nv_bfloat16, float)
template __global__ void k::backward_reduce_finalize_kernel<float>(const float*, const float*,
                                                                  int64_t, int, float*, float*);
template __global__ void k::backward_reduce_finalize_kernel<double>(const double*, const double*,
                                                                   int64_t, int, double*, double*);
"""

# What torch.utils.cpp_extension passes to nvcc for every CUDA source.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def _nvcc() -> str:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("nvcc not found (put it on PATH or set CUDA_HOME)")


# The package build uses C++20 (torch 2.14's headers need it); the kernels also stay C++17.
@pytest.mark.parametrize("arch,std", [("sm_80", "c++17"), ("sm_90", "c++20")])
def test_kernels_compile(arch, std, tmp_path):
    source = tmp_path / "kernels.cu"
    source.write_text(TRANSLATION_UNIT)
    result = subprocess.run(
        [_nvcc(), f"-std={std}", "-O3", f"-arch={arch}", *TORCH_NVCC_FLAGS, "-Xptxas=-v",
         "-Werror=all-warnings", f"-I{ROOT / 'csrc'}", "-c", str(source), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed for {arch}:\n{result.stderr}"
    assert (tmp_path / "kernels.o").stat().st_size > 0
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    assert spills and all(int(n) == 0 for n in spills), f"register spills for {arch}:\n{result.stderr}"
    stacks = re.findall(r"(\d+) bytes stack frame", result.stderr)
    assert all(int(n) == 0 for n in stacks), f"stack frames for {arch}:\n{result.stderr}"
