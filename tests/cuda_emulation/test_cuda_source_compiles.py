"""csrc/cuda/conv_bn_act_kernels.cuh compiles with nvcc for sm_80 and sm_90, every kernel
instantiated for float, double, __half and __nv_bfloat16, with the flags torch's build
uses (half conversions disabled). No torch headers, so this takes seconds; the full
csrc/cuda/conv_bn_act.cu is compiled by the package build. Also fails on register
spills and on local-memory stack use, which a memory-bound kernel should not need.
"""
from __future__ import annotations

import pytest

from nvcc import ARCH_STD, BN_FINALIZE, EVERY_DTYPE, compile_kernels

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
""" + EVERY_DTYPE + BN_FINALIZE


# The package build uses C++20 (torch 2.14's headers need it); the kernels also stay C++17.
@pytest.mark.parametrize("arch,std", ARCH_STD)
def test_kernels_compile(arch, std, tmp_path):
    assert len(compile_kernels(TRANSLATION_UNIT, arch, std, tmp_path)) == 5 * 4 + 2
