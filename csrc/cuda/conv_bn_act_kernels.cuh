// Device code of the CUDA backend of conv_bn_act: the four per-channel passes that
// follow the convolution (see csrc/common/conv_bn_act_driver.h for the formulas).
//
// No torch / ATen here, so that the same source compiles under nvcc (for
// csrc/cuda/conv_bn_act.cu) and under g++ with csrc/emulation/cuda_host_emulation.h
// (for tests/cuda_emulation). Therefore: only __shared__ memory and __syncthreads()
// for block reductions (no warp shuffles, no atomics), fixed-size shared arrays.
//
// Types: scalar_t is the data type (float, double, __half, __nv_bfloat16 under nvcc;
// float, double under the emulation); acc_t is the statistics type (double for double
// data, float otherwise). Per-channel vectors are acc_t.
//
// Layout: a 4-D tensor [N, C, H, W] is seen as [N, C, S] with S = H * W, and element
// (n, c, s) lives at n * stride_n + c * stride_c + s * stride_s. NCHW-contiguous is
// (C*S, S, 1), NHWC (channels_last) is (S*C, 1, C). Elementwise passes need all their
// tensors dense in the same layout and walk them by flat index.
//
// Reductions (batch_stats, backward_reduce) are two launches: a block of
// (tile_c x rows) threads reduces a tile of channels over a slice of the N*S rows into
// one partial per channel and block (stored [C][P]); a tiny finalize kernel, one
// thread per channel, combines the P partials in order. This was chosen over atomics
// because it is deterministic (same bits every run), it keeps Welford/Chan combination
// (a mean and M2 cannot be combined with atomicAdd; atomically summed sum/sum-of-
// squares lose all precision when |mean| >> std), and the partial buffer is tiny
// (C * P values, P <= kMaxPartials).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include "emulation/cuda_host_emulation.h"
#endif

namespace cnnkernels {
namespace conv_bn_act_cuda {

// Threads per block of every kernel; the reduction trees rely on it being a power of two.
constexpr int kThreads = 256;
// Upper bound on blocks per channel tile of a reduction (so also on partials per channel).
constexpr int kMaxPartials = 1024;

// ---------------------------------------------------------------------------------------
// Loads and stores through the accumulation type. Overloads instead of casts: torch
// builds with __CUDA_NO_HALF_CONVERSIONS__, so __half has no implicit float conversion.
__device__ __forceinline__ float load_value(const float* p) { return *p; }
__device__ __forceinline__ double load_value(const double* p) { return *p; }
__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_value(double* p, double v) { *p = v; }
#if defined(__CUDACC__)
__device__ __forceinline__ float load_value(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_value(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_value(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(load_value(p));
}

// ---------------------------------------------------------------------------------------
// Geometry shared by the launchers (csrc/cuda/conv_bn_act.cu and the emulation harness).

// A 4-D tensor seen as [N, C, S]: sizes and element strides (see the file comment).
struct Geometry {
  int64_t n, c, s;
  int64_t stride_n, stride_c, stride_s;
  __host__ __device__ int64_t numel() const { return n * c * s; }
};

inline Geometry nchw_geometry(int64_t n, int64_t c, int64_t s) { return {n, c, s, c * s, s, 1}; }
inline Geometry nhwc_geometry(int64_t n, int64_t c, int64_t s) { return {n, c, s, s * c, 1, c}; }

// Launch shape of a per-channel reduction: block (tile_c, kThreads / tile_c), grid
// (ceil(C / tile_c), partials). NCHW reads rows along S, so a block takes one channel
// and 256 rows; NHWC reads channels contiguously, so a block takes up to 32 channels.
struct ReduceLaunch {
  dim3 grid, block;
  int partials;  // P: blocks per channel tile = partial results per channel
};

inline ReduceLaunch reduce_launch(const Geometry& g, int max_blocks) {
  int tile_c = 1;
  if (g.stride_c == 1) {
    while (tile_c < 32 && tile_c < g.c) tile_c *= 2;
  }
  const int rows_per_block = kThreads / tile_c;
  const int64_t tiles = (g.c + tile_c - 1) / tile_c;
  const int64_t rows = g.n * g.s;
  int64_t partials = max_blocks / tiles;
  const int64_t useful = (rows + rows_per_block - 1) / rows_per_block;
  if (partials > useful) partials = useful;
  if (partials > kMaxPartials) partials = kMaxPartials;
  if (partials < 1) partials = 1;
  return {dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(partials)),
          dim3(tile_c, rows_per_block), static_cast<int>(partials)};
}

// Grid of the elementwise grid-stride loops and of the finalize kernels.
inline dim3 elementwise_grid(int64_t numel, int max_blocks) {
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return dim3(static_cast<unsigned int>(blocks));
}

// ---------------------------------------------------------------------------------------
// Cursors: walk a flat index by a fixed step with one compare per step, not a division.

// Rows r = n * S + s of one channel; the element offset is n * stride_n + s * stride_s.
struct RowCursor {
  int64_t n, s, step_n, step_s;
  __device__ __forceinline__ RowCursor(int64_t r, int64_t step, int64_t S)
      : n(r / S), s(r % S), step_n(step / S), step_s(step % S) {}
  __device__ __forceinline__ int64_t offset(const Geometry& g) const { return n * g.stride_n + s * g.stride_s; }
  __device__ __forceinline__ void advance(int64_t S) {
    s += step_s;
    n += step_n;
    if (s >= S) {
      s -= S;
      ++n;
    }
  }
};

// Channel of flat index i in a dense tensor: c = (i / inner) % C with inner = stride_c
// (S for NCHW, 1 for NHWC).
struct ChannelCursor {
  int64_t lo, c, step_lo, step_c;
  __device__ __forceinline__ ChannelCursor(int64_t i, int64_t step, int64_t inner, int64_t C)
      : lo(i % inner), c((i / inner) % C), step_lo(step % inner), step_c((step / inner) % C) {}
  __device__ __forceinline__ void advance(int64_t inner, int64_t C) {
    lo += step_lo;
    c += step_c;
    if (lo >= inner) {
      lo -= inner;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

// ---------------------------------------------------------------------------------------
// Welford / Chan: (mean, m2, count) of a set, m2 = sum of squared deviations.

template <typename acc_t>
__device__ __forceinline__ void welford_add(acc_t& mean, acc_t& m2, int64_t& count, acc_t x) {
  ++count;
  const acc_t delta = x - mean;
  mean += delta / static_cast<acc_t>(count);
  m2 += delta * (x - mean);
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
// batch_stats: per-channel mean and biased variance of y over (N, S).
// Welford runs on y - k[c], with k[c] = y[0, c, 0] a sample of the channel: when
// |mean| >> std the shifted values are small and exact (Sterbenz), so float32 keeps its
// full relative precision on the variance (plain Welford on 1e3 +- 1e-2 loses ~4 digits).

// Pass 1. Block (tile_c, rows) of ReduceLaunch; writes the shifted partial
// partial_{mean,m2,count}[c * P + p] for p = blockIdx.y, P = gridDim.y.
template <typename scalar_t, typename acc_t>
__global__ void batch_stats_partial_kernel(const scalar_t* __restrict__ y, Geometry g,
                                           acc_t* __restrict__ partial_mean, acc_t* __restrict__ partial_m2,
                                           int64_t* __restrict__ partial_count) {
  __shared__ acc_t s_mean[kThreads];
  __shared__ acc_t s_m2[kThreads];
  __shared__ int64_t s_count[kThreads];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  acc_t mean = 0, m2 = 0;
  int64_t count = 0;
  if (c < g.c) {
    const int64_t rows = g.n * g.s;
    const int64_t step = int64_t(blockDim.y) * gridDim.y;
    const scalar_t* y_c = y + c * g.stride_c;
    const acc_t k = load_acc<acc_t>(y_c);
    RowCursor cur(int64_t(blockIdx.y) * blockDim.y + threadIdx.y, step, g.s);
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += step) {
      welford_add(mean, m2, count, load_acc<acc_t>(y_c + cur.offset(g)) - k);
      cur.advance(g.s);
    }
  }
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
  if (threadIdx.y == 0 && c < g.c) {
    const int64_t at = c * gridDim.y + blockIdx.y;
    partial_mean[at] = mean;
    partial_m2[at] = m2;
    partial_count[at] = count;
  }
}

// Pass 2. One thread per channel: mean[c], biased var[c] from the P partials, the shift
// k[c] read again from y.
template <typename scalar_t, typename acc_t>
__global__ void batch_stats_finalize_kernel(const scalar_t* __restrict__ y, Geometry g,
                                            const acc_t* __restrict__ partial_mean,
                                            const acc_t* __restrict__ partial_m2,
                                            const int64_t* __restrict__ partial_count, int partials,
                                            acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < g.c;
       c += int64_t(blockDim.x) * gridDim.x) {
    acc_t mean = 0, m2 = 0;
    int64_t count = 0;
    for (int p = 0; p < partials; ++p) {
      const int64_t at = c * partials + p;
      welford_combine(mean, m2, count, partial_mean[at], partial_m2[at], partial_count[at]);
    }
    mean_out[c] = load_acc<acc_t>(y + c * g.stride_c) + mean;
    var_out[c] = count > 0 ? m2 / static_cast<acc_t>(count) : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------
// scale_shift_act: out = act(y * scale[c] + shift[c] (+ residual)), all dense in the
// layout of g; residual may be null. out may be y (in place), hence no __restrict__ on
// those two.
template <typename scalar_t, typename acc_t>
__global__ void scale_shift_act_kernel(const scalar_t* y, const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift, const scalar_t* __restrict__ residual,
                                       Geometry g, bool relu, scalar_t* out) {
  const int64_t numel = g.numel();
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelCursor cur(first, step, g.stride_c, g.c);
  for (int64_t i = first; i < numel; i += step) {
    acc_t z = load_acc<acc_t>(y + i) * scale[cur.c] + shift[cur.c];
    if (residual != nullptr) z += load_acc<acc_t>(residual + i);
    if (relu && z < acc_t(0)) z = acc_t(0);
    store_value(out + i, z);
    cur.advance(g.stride_c, g.c);
  }
}

// ---------------------------------------------------------------------------------------
// Backward. g = grad_out * (out > 0) for relu, grad_out for none.

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad(const scalar_t* grad_out, const scalar_t* out, int64_t i,
                                             bool relu) {
  const acc_t go = load_acc<acc_t>(grad_out + i);
  return (relu && !(load_acc<acc_t>(out + i) > acc_t(0))) ? acc_t(0) : go;
}

// backward_reduce pass 1: per channel and block, sum_g and sum_g_xhat with
// xhat = (y - mean[c]) * invstd[c]. y may be null: then only sum_g is computed and
// partial_sum_g_xhat is not written. Block and grid as in batch_stats_partial_kernel.
template <typename scalar_t, typename acc_t>
__global__ void backward_reduce_partial_kernel(const scalar_t* __restrict__ grad_out,
                                               const scalar_t* __restrict__ out,
                                               const scalar_t* __restrict__ y, const acc_t* __restrict__ mean,
                                               const acc_t* __restrict__ invstd, Geometry g, bool relu,
                                               acc_t* __restrict__ partial_sum_g,
                                               acc_t* __restrict__ partial_sum_g_xhat) {
  __shared__ acc_t s_sum_g[kThreads];
  __shared__ acc_t s_sum_gx[kThreads];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  acc_t sum_g = 0, sum_gx = 0;
  if (c < g.c) {
    const int64_t rows = g.n * g.s;
    const int64_t step = int64_t(blockDim.y) * gridDim.y;
    const int64_t base = c * g.stride_c;
    const acc_t mean_c = y != nullptr ? mean[c] : acc_t(0);
    RowCursor cur(int64_t(blockIdx.y) * blockDim.y + threadIdx.y, step, g.s);
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += step) {
      const int64_t i = base + cur.offset(g);
      const acc_t gi = masked_grad<scalar_t, acc_t>(grad_out, out, i, relu);
      sum_g += gi;
      if (y != nullptr) sum_gx += gi * (load_acc<acc_t>(y + i) - mean_c);
      cur.advance(g.s);
    }
    if (y != nullptr) sum_gx *= invstd[c];
  }
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
  if (threadIdx.y == 0 && c < g.c) {
    const int64_t at = c * gridDim.y + blockIdx.y;
    partial_sum_g[at] = sum_g;
    if (y != nullptr) partial_sum_g_xhat[at] = sum_gx;
  }
}

// backward_reduce pass 2: one thread per channel sums its P partials (in order).
// partial_sum_g_xhat / sum_g_xhat may be null (no y).
template <typename acc_t>
__global__ void backward_reduce_finalize_kernel(const acc_t* __restrict__ partial_sum_g,
                                                const acc_t* __restrict__ partial_sum_g_xhat, int64_t C,
                                                int partials, acc_t* __restrict__ sum_g,
                                                acc_t* __restrict__ sum_g_xhat) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    acc_t a = 0, b = 0;
    for (int p = 0; p < partials; ++p) {
      a += partial_sum_g[c * partials + p];
      if (sum_g_xhat != nullptr) b += partial_sum_g_xhat[c * partials + p];
    }
    sum_g[c] = a;
    if (sum_g_xhat != nullptr) sum_g_xhat[c] = b;
  }
}

// backward_elementwise:
//   grad_y   = g * g_scale[c] - (y - mean[c]) * y_scale[c] + shift[c]
//   grad_pre = g                          (the gradient of the residual)
// The y term is present only when y is non-null (training; mean and y_scale are read
// then only). grad_y or grad_pre may be null (not wanted).
template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(const scalar_t* __restrict__ grad_out,
                                            const scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                            const acc_t* __restrict__ mean, const acc_t* __restrict__ g_scale,
                                            const acc_t* __restrict__ y_scale, const acc_t* __restrict__ shift,
                                            Geometry g, bool relu, scalar_t* __restrict__ grad_y,
                                            scalar_t* __restrict__ grad_pre) {
  const int64_t numel = g.numel();
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelCursor cur(first, step, g.stride_c, g.c);
  for (int64_t i = first; i < numel; i += step) {
    const int64_t c = cur.c;
    const acc_t gi = masked_grad<scalar_t, acc_t>(grad_out, out, i, relu);
    if (grad_y != nullptr) {
      acc_t dy = gi * g_scale[c] + shift[c];
      if (y != nullptr) dy -= (load_acc<acc_t>(y + i) - mean[c]) * y_scale[c];
      store_value(grad_y + i, dy);
    }
    if (grad_pre != nullptr) store_value(grad_pre + i, gi);
    cur.advance(g.stride_c, g.c);
  }
}

}  // namespace conv_bn_act_cuda
}  // namespace cnnkernels
