"""csrc/cuda/se_excite_kernels.cuh compiles with nvcc for sm_80 and sm_90, every kernel
instantiated for float, double, __half and __nv_bfloat16, with the flags torch's build
uses (half conversions disabled); no register spills and no local-memory stack frames.
No torch headers, so this takes seconds; the full csrc/cuda/se_excite.cu is compiled by
the package build."""
from __future__ import annotations

import pytest

from nvcc import ARCH_STD, EVERY_DTYPE, compile_kernels

TRANSLATION_UNIT = r"""
#include "cuda/se_excite_kernels.cuh"

namespace k = cnnkernels::se_excite_cuda;

#define INSTANTIATE(T, A)                                                                     \
  template __global__ void k::squeeze_gate_kernel<T, A>(const T*, k::Geometry, const T*,      \
                                                       const T*, const T*, const T*, int64_t, \
                                                       A*, A*, A*);                           \
  template __global__ void k::scale_kernel<T, A>(const T*, const A*, const T*, k::Geometry,   \
                                                bool, T*);                                    \
  template __global__ void k::backward_sample_kernel<T, A>(                                   \
      const T*, const T*, const T*, k::Geometry, const T*, const T*, int64_t, const A*,       \
      const A*, bool, A*, A*, A*);                                                            \
  template __global__ void k::weight_grad_kernel<T, A>(const A*, const A*, int64_t, int64_t,  \
                                                      int64_t, T*, T*);                       \
  template __global__ void k::backward_elementwise_kernel<T, A>(                              \
      const T*, const T*, const A*, const A*, k::Geometry, bool, T*, T*);
""" + EVERY_DTYPE


@pytest.mark.parametrize("arch,std", ARCH_STD)
def test_se_excite_kernels_compile(arch, std, tmp_path):
    assert len(compile_kernels(TRANSLATION_UNIT, arch, std, tmp_path)) == 5 * 4
