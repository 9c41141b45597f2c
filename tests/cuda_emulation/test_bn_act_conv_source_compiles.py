"""csrc/cuda/bn_act_conv_kernels.cuh compiles with nvcc for sm_80 and sm_90, every kernel
(the four conv_kernel variants included) instantiated for float, double, __half and
__nv_bfloat16, with the flags torch's build uses (half conversions disabled); no
register spills (stores or loads) and no local-memory stack frames. No torch headers, so
this takes seconds; the full csrc/cuda/bn_act_conv.cu is compiled by the package build."""
from __future__ import annotations

import re
import subprocess

import pytest

from test_cuda_source_compiles import ROOT, TORCH_NVCC_FLAGS, _nvcc

TRANSLATION_UNIT = r"""
#include "cuda/bn_act_conv_kernels.cuh"

namespace k = cnnkernels::bn_act_conv_cuda;
namespace bn = cnnkernels::bn_cuda;

#define INSTANTIATE(T, A)                                                                          \
  template __global__ void k::batch_stats_partial_kernel<T, A>(const T*, k::Shape, k::Strides, A*, \
                                                              A*, int64_t*);                       \
  template __global__ void k::batch_stats_finalize_kernel<T, A>(                                   \
      const T*, k::Shape, k::Strides, const A*, const A*, const int64_t*, int, A*, A*);            \
  template __global__ void k::conv_kernel<T, A, k::WideTile, true>(k::ConvArgs<T, A>);             \
  template __global__ void k::conv_kernel<T, A, k::WideTile, false>(k::ConvArgs<T, A>);            \
  template __global__ void k::conv_kernel<T, A, k::NarrowTile, true>(k::ConvArgs<T, A>);           \
  template __global__ void k::conv_kernel<T, A, k::NarrowTile, false>(k::ConvArgs<T, A>);          \
  template __global__ void k::bn_act_kernel<T, A>(const T*, k::WalkStrides, const A*, const A*,    \
                                                 bool, k::Walk, T*, k::WalkStrides);               \
  template __global__ void k::backward_reduce_partial_kernel<T, A>(                                \
      const T*, k::Strides, const T*, k::Strides, k::Shape, const A*, const A*, const A*,          \
      const A*, bool, A*, A*);                                                                     \
  template __global__ void k::backward_elementwise_kernel<T, A>(                                   \
      const T*, k::WalkStrides, const T*, k::WalkStrides, k::Walk, const A*, const A*, const A*,   \
      const A*, const A*, const A*, bool, T*, k::WalkStrides);

INSTANTIATE(float, float)
INSTANTIATE(double, double)
INSTANTIATE(__half, float)
INSTANTIATE(__nv_bfloat16, float)
template __global__ void bn::backward_reduce_finalize_kernel<float>(const float*, const float*, int64_t, int, float*, float*);
template __global__ void bn::backward_reduce_finalize_kernel<double>(const double*, const double*, int64_t, int, double*, double*);
"""

KERNELS_PER_ARCH = 9 * 4 + 2  # nine templates x four dtypes, two finalize instantiations


@pytest.mark.parametrize("arch,std", [("sm_80", "c++17"), ("sm_90", "c++20")])
def test_bn_act_conv_kernels_compile(arch, std, tmp_path):
    source = tmp_path / "bn_act_conv_kernels.cu"
    source.write_text(TRANSLATION_UNIT)
    result = subprocess.run(
        [_nvcc(), f"-std={std}", "-O3", f"-arch={arch}", *TORCH_NVCC_FLAGS, "-Xptxas=-v",
         "-Werror=all-warnings", f"-I{ROOT / 'csrc'}", "-c", str(source), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed for {arch}:\n{result.stderr}"
    assert (tmp_path / "kernels.o").stat().st_size > 0
    spill_stores = re.findall(r"(\d+) bytes spill stores", result.stderr)
    spill_loads = re.findall(r"(\d+) bytes spill loads", result.stderr)
    assert len(spill_stores) == len(spill_loads) == KERNELS_PER_ARCH, f"unexpected ptxas report:\n{result.stderr}"
    assert all(int(n) == 0 for n in spill_stores + spill_loads), f"register spills for {arch}:\n{result.stderr}"
    stacks = re.findall(r"(\d+) bytes stack frame", result.stderr)
    assert all(int(n) == 0 for n in stacks), f"stack frames for {arch}:\n{result.stderr}"
