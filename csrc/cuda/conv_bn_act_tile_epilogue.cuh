// The epilogue shared by the specialised convolution kernels of conv_bn_act
// (conv1x1_bn_act_kernels.cuh, grouped_conv_bn_act_kernels.cuh) and the kernel that
// merges their per-tile statistics. Torch-free like conv_bn_act_kernels.cuh (whose
// loads, stores and Welford/Chan helpers it reuses), so it also runs under
// csrc/emulation/cuda_host_emulation.h.
//
// Both convolution kernels use the same thread layout: a block of kConvThreads = 256
// threads computes a tile of up to 64 output pixels x 64 output channels, every thread
// a 4 x 4 micro-tile of it (pixel rows `row`, channel columns `col`, local to the
// tile); thread t is lane (t % 16) of row group (t / 16). Outputs are channels_last:
// pixel m = (n * H_out + h) * W_out + w, channel co at m * C_out + co.
// Element offsets are 32-bit: the kernels run only on tensors of at most 2^30 elements
// (csrc/common/conv_bn_act_kernel_choice.h sends bigger ones to cuDNN), which
// keeps 64-bit index arithmetic out of the registers of the 4 x 4 micro-tiles.
//
// Eval: out = act(acc * scale[co] + shift[co] (+ residual)), written once.
// Training: y = acc + bias[co] is written (conv_out), and each block stores, for every
// channel of its tile, the mean and M2 (sum of squared deviations from that mean) of
// the y values of its pixels: partial_mean / partial_m2 [C_out][P], P = pixel tiles,
// with the tile's pixel count in partial_count[P]. The mean is taken first and M2 about
// it (two passes over registers), so M2 keeps full precision when |mean| >> std;
// tile_stats_merge_kernel then combines the P tiles of each channel with Chan's formula,
// in a fixed order (deterministic, no atomics).
#pragma once

#include <cstdint>

#include "cuda/conv_bn_act_kernels.cuh"

#if defined(__CUDACC__)
#define CNNKERNELS_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#else
#define CNNKERNELS_LAUNCH_BOUNDS(threads)
#endif

namespace cnnkernels {
namespace conv_bn_act_cuda {

constexpr int kConvThreads = 256;
constexpr int kConvLanes = 16;      // threads per row group; also row groups per block
constexpr int kConvMicro = 4;       // a thread's micro-tile is kConvMicro x kConvMicro
constexpr int kConvTilePixels = kConvLanes * kConvMicro;    // 64
constexpr int kConvTileChannels = kConvLanes * kConvMicro;  // 64

// Pointers of the epilogue; the mode (eval or training) is a template flag of the kernel.
template <typename scalar_t, typename acc_t>
struct TileEpilogue {
  int c_out;
  // eval: scale, shift [C_out]; residual (may be null) and out dense channels_last.
  const acc_t* scale;
  const acc_t* shift;
  const scalar_t* residual;
  bool relu;
  scalar_t* out;
  // training: bias [C_out] (may be null), y dense channels_last, partials as above.
  const acc_t* bias;
  scalar_t* y;
  acc_t* partial_mean;
  acc_t* partial_m2;
  int* partial_count;
  int partials;
};

// Where a thread's micro-tile lands: the output pixel of each row (m < 0: outside the
// output), the local column (0..63) of each column and the tile's first channel;
// channels_in_tile columns of the tile are real channels (base_channel + column).
struct TilePlace {
  int m[kConvMicro];
  int col[kConvMicro];
  int base_channel;
  int channels_in_tile;
  int pixels_in_tile;  // valid rows of the whole tile (the statistics' count)
  int tile;            // p: this block's index among the P pixel tiles
  bool writes_count;   // the one block per pixel tile that stores partial_count[p]
};

// Eval epilogue of one thread.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void eval_epilogue(const acc_t (&acc)[kConvMicro][kConvMicro], const TilePlace& at,
                                              const TileEpilogue<scalar_t, acc_t>& e) {
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
    if (at.m[i] < 0) continue;
#pragma unroll
    for (int j = 0; j < kConvMicro; ++j) {
      if (at.col[j] >= at.channels_in_tile) continue;
      const int co = at.base_channel + at.col[j];
      const int index = at.m[i] * e.c_out + co;
      acc_t v = acc[i][j] * e.scale[co] + e.shift[co];
      if (e.residual != nullptr) v += load_acc<acc_t>(e.residual + index);
      if (e.relu && v < acc_t(0)) v = acc_t(0);
      store_value(e.out + index, v);
    }
  }
}

// Training epilogue: every thread of the block calls it (it synchronises the block).
// scratch: at least kConvLanes * kConvTileChannels + kConvTileChannels acc_t of shared
// memory that no thread reads any more (the caller synchronised after its last use).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void training_epilogue(acc_t (&acc)[kConvMicro][kConvMicro], const TilePlace& at,
                                                  const TileEpilogue<scalar_t, acc_t>& e, acc_t* scratch) {
  acc_t* s_sum = scratch;                                    // [kConvLanes][kConvTileChannels]
  acc_t* s_mean = scratch + kConvLanes * kConvTileChannels;  // [kConvTileChannels]
  const int tid = threadIdx.x;
  const int group = tid / kConvLanes;
  // y = acc + bias, stored; acc keeps the stored value for the statistics.
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kConvMicro; ++j) {
      const bool real = at.m[i] >= 0 && at.col[j] < at.channels_in_tile;
      const int co = at.base_channel + at.col[j];
      acc_t v = acc[i][j];
      if (real && e.bias != nullptr) v += e.bias[co];
      v = rounded<scalar_t>(v);
      if (real) store_value(e.y + at.m[i] * e.c_out + co, v);
      acc[i][j] = v;
    }
  }
  // Pass 1: column sums -> tile mean.
#pragma unroll
  for (int j = 0; j < kConvMicro; ++j) {
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < kConvMicro; ++i) {
      if (at.m[i] >= 0) sum += acc[i][j];
    }
    s_sum[group * kConvTileChannels + at.col[j]] = sum;
  }
  __syncthreads();
  if (tid < kConvTileChannels) {
    acc_t sum = 0;
    for (int g = 0; g < kConvLanes; ++g) sum += s_sum[g * kConvTileChannels + tid];
    s_mean[tid] = sum / static_cast<acc_t>(at.pixels_in_tile);
  }
  __syncthreads();
  // Pass 2: column sums of squared deviations from the tile mean -> M2.
#pragma unroll
  for (int j = 0; j < kConvMicro; ++j) {
    const acc_t mean = s_mean[at.col[j]];
    acc_t m2 = 0;
#pragma unroll
    for (int i = 0; i < kConvMicro; ++i) {
      const acc_t d = acc[i][j] - mean;
      if (at.m[i] >= 0) m2 += d * d;
    }
    s_sum[group * kConvTileChannels + at.col[j]] = m2;
  }
  __syncthreads();
  if (tid < at.channels_in_tile) {
    acc_t m2 = 0;
    for (int g = 0; g < kConvLanes; ++g) m2 += s_sum[g * kConvTileChannels + tid];
    const int index = (at.base_channel + tid) * e.partials + at.tile;
    e.partial_mean[index] = s_mean[tid];
    e.partial_m2[index] = m2;
  }
  if (tid == 0 && at.writes_count) e.partial_count[at.tile] = at.pixels_in_tile;
}

// Threads per block of tile_stats_merge_kernel: a power of two, from a warp up to
// kThreads, no more than the partials need.
inline unsigned int merge_threads(int64_t partials) {
  unsigned int threads = 32;
  while (threads < static_cast<unsigned int>(kThreads) && threads < partials) threads *= 2;
  return threads;
}

// mean[c], biased var[c] from the P tile partials of channel c: one block of
// merge_threads(P) threads per channel (grid-stride over channels); thread t
// Chan-merges tiles t, t + blockDim.x, ... in order, then a fixed tree merges the threads.
template <typename acc_t>
__global__ void tile_stats_merge_kernel(const acc_t* __restrict__ partial_mean, const acc_t* __restrict__ partial_m2,
                                        const int* __restrict__ partial_count, int64_t partials, int64_t channels,
                                        acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  __shared__ acc_t s_mean[kThreads];
  __shared__ acc_t s_m2[kThreads];
  __shared__ int64_t s_count[kThreads];
  const int tid = threadIdx.x;
  for (int64_t c = blockIdx.x; c < channels; c += gridDim.x) {
    acc_t mean = 0, m2 = 0;
    int64_t count = 0;
    for (int64_t p = tid; p < partials; p += blockDim.x) {
      welford_combine(mean, m2, count, partial_mean[c * partials + p], partial_m2[c * partials + p],
                      static_cast<int64_t>(partial_count[p]));
    }
    s_mean[tid] = mean;
    s_m2[tid] = m2;
    s_count[tid] = count;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
      if (static_cast<unsigned int>(tid) < half) {
        welford_combine(mean, m2, count, s_mean[tid + half], s_m2[tid + half], s_count[tid + half]);
        s_mean[tid] = mean;
        s_m2[tid] = m2;
        s_count[tid] = count;
      }
      __syncthreads();
    }
    if (tid == 0) {
      mean_out[c] = mean;
      var_out[c] = count > 0 ? m2 / static_cast<acc_t>(count) : acc_t(0);
    }
    __syncthreads();  // s_* are rewritten for the next channel
  }
}

}  // namespace conv_bn_act_cuda
}  // namespace cnnkernels
