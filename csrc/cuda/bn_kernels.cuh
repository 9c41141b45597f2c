// BatchNorm device code shared by the CUDA backends of conv_bn_act
// (csrc/cuda/conv_bn_act_kernels.cuh) and bn_act_conv (csrc/cuda/bn_act_conv_kernels.cuh):
// the launch shapes of the per-channel reductions, Welford / Chan statistics and the block
// reduction trees, and the finalize kernel of the backward reduction (loads and stores
// are csrc/cuda/device_io.cuh). Each op's kernels address their tensors their own
// way (dense [N, C, S] geometry, or arbitrary strides); what is here does not depend on it.
//
// No torch / ATen here, so that the same source compiles under nvcc and under g++ with
// csrc/emulation/cuda_host_emulation.h (tests/cuda_emulation). Therefore: only
// __shared__ memory and __syncthreads() for block reductions (no warp shuffles, no
// atomics); the __shared__ arrays stay in the kernels and are passed in here.
//
// Reductions are two launches: a block of (tile_c x rows) threads reduces a tile of
// channels over a slice of the rows into one partial per channel and block (stored
// [C][P]); a finalize kernel, one thread per channel, combines the P partials in order.
// Deterministic (same bits every run) and able to merge Welford/Chan states, which
// atomics are not.
#pragma once

#include <cstdint>

#include "cuda/device_io.cuh"

namespace cnnkernels {
namespace bn_cuda {

using namespace device_io;  // load_acc, store_value, masked_grad, grid_stride_blocks, ...

// Threads per block of every kernel; the reduction trees rely on it being a power of two.
constexpr int kThreads = 256;
// Upper bound on blocks per channel tile of a reduction (so also on partials per channel).
constexpr int kMaxPartials = 1024;

// ---------------------------------------------------------------------------------------
// Launch shapes (host).

// A per-channel reduction over `rows` rows of `c` channels: block (tile_c, kThreads /
// tile_c), grid (ceil(C / tile_c), partials). With channel_tiles (channels contiguous in
// memory) a block puts up to 32 channels across threadIdx.x (coalesced loads); otherwise
// a block takes one channel and 256 rows.
struct ReduceLaunch {
  dim3 grid, block;
  int partials;  // P: blocks per channel tile = partial results per channel
};

inline ReduceLaunch reduce_launch(int64_t c, int64_t rows, bool channel_tiles, int max_blocks) {
  int tile_c = 1;
  if (channel_tiles) {
    while (tile_c < 32 && tile_c < c) tile_c *= 2;
  }
  const int rows_per_block = kThreads / tile_c;
  const int64_t tiles = (c + tile_c - 1) / tile_c;
  int64_t partials = max_blocks / (tiles > 0 ? tiles : 1);
  const int64_t useful = (rows + rows_per_block - 1) / rows_per_block;
  if (partials > useful) partials = useful;
  if (partials > kMaxPartials) partials = kMaxPartials;
  if (partials < 1) partials = 1;
  return {dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(partials)),
          dim3(tile_c, rows_per_block), static_cast<int>(partials)};
}

// Grid of the grid-stride elementwise loops and of the finalize kernels.
inline dim3 elementwise_grid(int64_t numel, int max_blocks) { return grid_stride_blocks(numel, kThreads, max_blocks); }

// ---------------------------------------------------------------------------------------
// Welford / Chan: (mean, m2, count) of a set, m2 = sum of squared deviations.

template <typename acc_t>
__device__ __forceinline__ void welford_add(acc_t& mean, acc_t& m2, int64_t& count, acc_t v) {
  ++count;
  const acc_t delta = v - mean;
  mean += delta / static_cast<acc_t>(count);
  m2 += delta * (v - mean);
}

template <typename acc_t>
__device__ __forceinline__ void welford_combine(acc_t& mean, acc_t& m2, int64_t& count, acc_t mean_b,
                                                acc_t m2_b, int64_t count_b) {
  if (count_b == 0) return;
  const int64_t total = count + count_b;
  const acc_t delta = mean_b - mean;
  const acc_t weight_b = static_cast<acc_t>(count_b) / static_cast<acc_t>(total);
  mean += delta * weight_b;
  m2 += m2_b + delta * delta * static_cast<acc_t>(count) * weight_b;
  count = total;
}

// ---------------------------------------------------------------------------------------
// Reduction-pass epilogues, for a block of ReduceLaunch shape: the threads of one column
// (same threadIdx.x, i.e. channel c) merge their states down threadIdx.y in a tree, and
// thread y = 0 of a valid channel writes the block's partial at [c * P + p], p =
// blockIdx.y, P = gridDim.y. s_* are the kernel's __shared__ arrays of kThreads values.

// Chan merge of (mean, m2, count) states (batch statistics).
template <typename acc_t>
__device__ __forceinline__ void store_block_welford(acc_t mean, acc_t m2, int64_t count, int64_t c, bool valid,
                                                    acc_t* s_mean, acc_t* s_m2, int64_t* s_count,
                                                    acc_t* __restrict__ partial_mean,
                                                    acc_t* __restrict__ partial_m2,
                                                    int64_t* __restrict__ partial_count) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  s_mean[tid] = mean;
  s_m2[tid] = m2;
  s_count[tid] = count;
  __syncthreads();
  for (unsigned int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      const int other = tid + half * blockDim.x;
      welford_combine(mean, m2, count, s_mean[other], s_m2[other], s_count[other]);
      s_mean[tid] = mean;
      s_m2[tid] = m2;
      s_count[tid] = count;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && valid) {
    const int64_t at = c * gridDim.y + blockIdx.y;
    partial_mean[at] = mean;
    partial_m2[at] = m2;
    partial_count[at] = count;
  }
}

// Sums of (sum_g, sum_gx) (backward reduction); partial_sum_gx may be null (not written).
template <typename acc_t>
__device__ __forceinline__ void store_block_sums(acc_t sum_g, acc_t sum_gx, int64_t c, bool valid, acc_t* s_sum_g,
                                                 acc_t* s_sum_gx, acc_t* __restrict__ partial_sum_g,
                                                 acc_t* __restrict__ partial_sum_gx) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  s_sum_g[tid] = sum_g;
  s_sum_gx[tid] = sum_gx;
  __syncthreads();
  for (unsigned int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      const int other = tid + half * blockDim.x;
      sum_g += s_sum_g[other];
      sum_gx += s_sum_gx[other];
      s_sum_g[tid] = sum_g;
      s_sum_gx[tid] = sum_gx;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && valid) {
    const int64_t at = c * gridDim.y + blockIdx.y;
    partial_sum_g[at] = sum_g;
    if (partial_sum_gx != nullptr) partial_sum_gx[at] = sum_gx;
  }
}

// Batch statistics finalize of channel c: mean_out[c] = shift + merged mean of the P
// shifted partials (in order), var_out[c] = biased variance (0 for an empty channel).
template <typename acc_t>
__device__ __forceinline__ void finalize_batch_stats(int64_t c, acc_t shift, const acc_t* __restrict__ partial_mean,
                                                     const acc_t* __restrict__ partial_m2,
                                                     const int64_t* __restrict__ partial_count, int partials,
                                                     acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  acc_t mean = 0, m2 = 0;
  int64_t count = 0;
  for (int p = 0; p < partials; ++p) {
    const int64_t at = c * partials + p;
    welford_combine(mean, m2, count, partial_mean[at], partial_m2[at], partial_count[at]);
  }
  mean_out[c] = shift + mean;
  var_out[c] = count > 0 ? m2 / static_cast<acc_t>(count) : acc_t(0);
}

// ---------------------------------------------------------------------------------------
// backward_reduce pass 2: one thread per channel sums its P partials (in order).
// partial_sum_g_xhat and sum_g_xhat are both null or both not.
template <typename acc_t>
__global__ void backward_reduce_finalize_kernel(const acc_t* __restrict__ partial_sum_g,
                                                const acc_t* __restrict__ partial_sum_g_xhat, int64_t C,
                                                int partials, acc_t* __restrict__ sum_g,
                                                acc_t* __restrict__ sum_g_xhat) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(blockDim.x) * gridDim.x) {
    acc_t a = 0, b = 0;
    for (int p = 0; p < partials; ++p) {
      a += partial_sum_g[c * partials + p];
      if (sum_g_xhat != nullptr) b += partial_sum_g_xhat[c * partials + p];
    }
    sum_g[c] = a;
    if (sum_g_xhat != nullptr) sum_g_xhat[c] = b;
  }
}

}  // namespace bn_cuda
}  // namespace cnnkernels
