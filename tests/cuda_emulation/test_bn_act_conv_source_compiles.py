"""csrc/cuda/bn_act_conv_kernels.cuh compiles with nvcc for sm_80 and sm_90, every kernel
(the four conv_kernel variants included) instantiated for float, double, __half and
__nv_bfloat16, with the flags torch's build uses (half conversions disabled); no
register spills (stores or loads) and no local-memory stack frames. No torch headers, so
this takes seconds; the full csrc/cuda/bn_act_conv.cu is compiled by the package build."""
from __future__ import annotations

import pytest

from nvcc import ARCH_STD, BN_FINALIZE, EVERY_DTYPE, compile_kernels

TRANSLATION_UNIT = r"""
#include "cuda/bn_act_conv_kernels.cuh"

namespace k = cnnkernels::bn_act_conv_cuda;

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
""" + EVERY_DTYPE + BN_FINALIZE

KERNELS_PER_ARCH = 9 * 4 + 2  # nine templates x four dtypes, two finalize instantiations


@pytest.mark.parametrize("arch,std", ARCH_STD)
def test_bn_act_conv_kernels_compile(arch, std, tmp_path):
    assert len(compile_kernels(TRANSLATION_UNIT, arch, std, tmp_path)) == KERNELS_PER_ARCH
