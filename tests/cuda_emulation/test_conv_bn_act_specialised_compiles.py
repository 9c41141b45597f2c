"""The specialised convolution kernels of conv_bn_act (csrc/cuda/conv1x1_bn_act_kernels.cuh,
grouped_conv_bn_act_kernels.cuh, conv_bn_act_tile_epilogue.cuh) compile with nvcc for
sm_80 and sm_90, every instantiation that csrc/cuda/conv_bn_act.cu launches, with torch's
nvcc flags: no warnings, no register spills, no stack frames, static shared memory
within the 48 KB a block may declare. Run with -s to see registers per kernel."""
from __future__ import annotations

import pytest

from nvcc import ARCH_STD, compile_kernels

TRANSLATION_UNIT = r"""
#include "cuda/conv1x1_bn_act_kernels.cuh"
#include "cuda/grouped_conv_bn_act_kernels.cuh"

namespace k = cnnkernels::conv_bn_act_cuda;

#define CONV1X1(T, A, TRAIN)                                                                 \
  template __global__ void k::conv1x1_bn_act_kernel<T, A, TRAIN>(const T*, const T*,         \
                                                                k::Conv1x1Geometry,          \
                                                                k::TileEpilogue<T, A>);
#define GROUPED(T, A, S, TRAIN, ALIGNED)                                                     \
  template __global__ void k::grouped_conv_bn_act_kernel<T, A, S, TRAIN, ALIGNED>(           \
      const T*, const T*, k::GroupedConvGeometry, k::TileEpilogue<T, A>);
#define GROUPED_ALL(T, A)                                                                    \
  GROUPED(T, A, 1, false, true) GROUPED(T, A, 1, false, false)                               \
  GROUPED(T, A, 1, true, true) GROUPED(T, A, 1, true, false)                                 \
  GROUPED(T, A, 2, false, true) GROUPED(T, A, 2, false, false)                               \
  GROUPED(T, A, 2, true, true) GROUPED(T, A, 2, true, false)

CONV1X1(float, float, false)
CONV1X1(float, float, true)
CONV1X1(double, double, false)
CONV1X1(double, double, true)
GROUPED_ALL(float, float)
GROUPED_ALL(double, double)
GROUPED_ALL(__half, float)
GROUPED_ALL(__nv_bfloat16, float)
template __global__ void k::tile_stats_merge_kernel<float>(const float*, const float*, const int*, int64_t,
                                                           int64_t, float*, float*);
template __global__ void k::tile_stats_merge_kernel<double>(const double*, const double*, const int*, int64_t,
                                                            int64_t, double*, double*);
"""

EXPECTED_KERNELS = 4 + 4 * 8 + 2
STATIC_SHARED_LIMIT = 48 * 1024


@pytest.mark.parametrize("arch,std", ARCH_STD)
def test_specialised_kernels_compile(arch, std, tmp_path):
    kernels = compile_kernels(TRANSLATION_UNIT, arch, std, tmp_path)
    assert len(kernels) == EXPECTED_KERNELS, [k.name for k in kernels]
    too_big = [k for k in kernels if k.shared_bytes > STATIC_SHARED_LIMIT]
    assert not too_big, f"static shared memory over 48 KB for {arch}: {too_big}"
    for kernel in kernels:
        print(f"{arch} {kernel.registers:3d} registers {kernel.spill_stores} spill stores "
              f"{kernel.shared_bytes:6d} B smem  {kernel.name}")
