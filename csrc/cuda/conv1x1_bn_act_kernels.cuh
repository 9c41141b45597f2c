// conv_bn_act for 1x1 convolutions (stride 1 or 2, padding 0, groups 1) on channels_last
// data, as one GEMM with the BatchNorm / residual / activation work in its epilogue:
//   out[m, co] = sum_k x[pixel(m), k] * weight[co, k]      m over N * H_out * W_out,
// pixel(m) = (n, h_out * stride, w_out * stride); A = x's channels_last rows (k = C_in
// contiguous), B = weight [C_out, C_in] (k contiguous), output rows channels_last.
//
// Classic shared-memory tiling with SIMT FMA: a block of kConvThreads threads computes a
// 64 x 64 tile of (pixels x output channels), looping over C_in in steps of 16: the A
// and B slices are staged in shared memory in the accumulation type (so float16 /
// bfloat16 are converted once), then every thread updates its 4 x 4 micro-tile (rows
// tr + 16 i, columns tc + 16 j: consecutive threads read consecutive shared words and
// write consecutive channels). The epilogue is conv_bn_act_tile_epilogue.cuh's.
//
// No tensor-core intrinsics (mma / wmma), so that the host emulation runs this source
// in tests; the tensor-core version of this GEMM is its Triton twin's job
// (cnnkernels/triton). csrc/common/conv_bn_act_kernel_choice.h picks this kernel only
// where cuDNN would not use tensor cores either (float64, float32 without TF32).
#pragma once

#include <cstdint>

#include "cuda/conv_bn_act_tile_epilogue.cuh"

namespace cnnkernels {
namespace conv_bn_act_cuda {

constexpr int kGemmTileK = 16;  // C_in per shared-memory stage

// x [n, c_in, h, w] and output [n, c_out, h_out, w_out], both dense channels_last and
// of at most 2^30 elements (32-bit offsets).
struct Conv1x1Geometry {
  int n, c_in, h, w;
  int c_out, h_out, w_out;
  int stride;
  __host__ __device__ int pixels() const { return n * h_out * w_out; }
};

inline Conv1x1Geometry conv1x1_geometry(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,
                                        int64_t stride) {
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  return {i(n), i(c_in), i(h), i(w), i(c_out), i((h - 1) / stride + 1), i((w - 1) / stride + 1), i(stride)};
}

// Grid (pixel tiles, channel tiles); the pixel tiles are the P of the training partials.
inline dim3 conv1x1_grid(const Conv1x1Geometry& g) {
  return dim3(static_cast<unsigned int>((int64_t(g.pixels()) + kConvTilePixels - 1) / kConvTilePixels),
              static_cast<unsigned int>((g.c_out + kConvTileChannels - 1) / kConvTileChannels));
}

// Block kConvThreads, grid conv1x1_grid(g). weight [c_out, c_in] contiguous.
template <typename scalar_t, typename acc_t, bool kTraining>
__global__ void CNNKERNELS_LAUNCH_BOUNDS(kConvThreads)
    conv1x1_bn_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight, Conv1x1Geometry g,
                          TileEpilogue<scalar_t, acc_t> e) {
  // +1: the stores below walk k across threads; the padding spreads them over banks.
  __shared__ acc_t s_a[kGemmTileK][kConvTilePixels + 1];    // x slice, [k][pixel]
  __shared__ acc_t s_b[kGemmTileK][kConvTileChannels + 1];  // weight slice, [k][channel]
  __shared__ acc_t s_scratch[kConvLanes * kConvTileChannels + kConvTileChannels];

  const int tid = threadIdx.x;
  const int tr = tid / kConvLanes, tc = tid % kConvLanes;
  const int pixels = g.pixels();
  const int m0 = blockIdx.x * kConvTilePixels;
  const int co0 = blockIdx.y * kConvTileChannels;
  const int hw_out = g.h_out * g.w_out;

  // Staging: thread t loads k = k0 + tc of tile rows tr + 16 q (x) and of tile columns
  // tr + 16 q (weight), q = 0..3.
  int x_row[kConvMicro];  // element offset of the row's pixel in x, -1 outside
  int w_row[kConvMicro];  // element offset of the column's weight row, -1 outside
#pragma unroll
  for (int q = 0; q < kConvMicro; ++q) {
    const int m = m0 + tr + kConvLanes * q;
    x_row[q] = -1;
    if (m < pixels) {
      const int n = m / hw_out, rest = m % hw_out;
      const int h = (rest / g.w_out) * g.stride, w = (rest % g.w_out) * g.stride;
      x_row[q] = ((n * g.h + h) * g.w + w) * g.c_in;
    }
    const int co = co0 + tr + kConvLanes * q;
    w_row[q] = co < g.c_out ? co * g.c_in : -1;
  }

  acc_t acc[kConvMicro][kConvMicro];
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kConvMicro; ++j) acc[i][j] = acc_t(0);
  }

  for (int k0 = 0; k0 < g.c_in; k0 += kGemmTileK) {
    const int k = k0 + tc;
    const bool k_ok = k < g.c_in;
#pragma unroll
    for (int q = 0; q < kConvMicro; ++q) {
      const int r = tr + kConvLanes * q;
      s_a[tc][r] = (k_ok && x_row[q] >= 0) ? load_acc<acc_t>(x + x_row[q] + k) : acc_t(0);
      s_b[tc][r] = (k_ok && w_row[q] >= 0) ? load_acc<acc_t>(weight + w_row[q] + k) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmTileK; ++kk) {
      acc_t a[kConvMicro], b[kConvMicro];
#pragma unroll
      for (int i = 0; i < kConvMicro; ++i) a[i] = s_a[kk][tr + kConvLanes * i];
#pragma unroll
      for (int j = 0; j < kConvMicro; ++j) b[j] = s_b[kk][tc + kConvLanes * j];
#pragma unroll
      for (int i = 0; i < kConvMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kConvMicro; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }

  TilePlace at;
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
    const int m = m0 + tr + kConvLanes * i;
    at.m[i] = m < pixels ? m : -1;
    at.col[i] = tc + kConvLanes * i;
  }
  at.base_channel = co0;
  at.channels_in_tile = g.c_out - co0 < kConvTileChannels ? g.c_out - co0 : kConvTileChannels;
  at.pixels_in_tile = pixels - m0 < kConvTilePixels ? pixels - m0 : kConvTilePixels;
  at.tile = blockIdx.x;
  at.writes_count = blockIdx.y == 0;
  if constexpr (kTraining) {
    training_epilogue<scalar_t>(acc, at, e, s_scratch);
  } else {
    eval_epilogue<scalar_t>(acc, at, e);
  }
}

}  // namespace conv_bn_act_cuda
}  // namespace cnnkernels
