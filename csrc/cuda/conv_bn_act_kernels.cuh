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
// Reductions (batch_stats, backward_reduce) are two launches, partials per block then a
// finalize merging them in order; the machinery they share with bn_act_conv (loads and
// stores, launch shapes, Welford / Chan, the block trees, backward_reduce_finalize_kernel)
// is in csrc/cuda/bn_kernels.cuh.
#pragma once

#include <cstdint>

#include "cuda/bn_kernels.cuh"

namespace cnnkernels {
namespace conv_bn_act_cuda {

using namespace bn_cuda;  // kThreads, ReduceLaunch, welford_*, ... and device_io (load_acc, store_value, ...)

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

// Launch shape of a per-channel reduction (bn_cuda::reduce_launch): NCHW reads rows
// along S, so a block takes one channel and 256 rows; NHWC reads channels contiguously,
// so a block takes up to 32 channels.
inline ReduceLaunch reduce_launch(const Geometry& g, int max_blocks) {
  return bn_cuda::reduce_launch(g.c, g.n * g.s, g.stride_c == 1, max_blocks);
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
  store_block_welford(mean, m2, count, c, c < g.c, s_mean, s_m2, s_count, partial_mean, partial_m2, partial_count);
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
    finalize_batch_stats(c, load_acc<acc_t>(y + c * g.stride_c), partial_mean, partial_m2, partial_count, partials,
                         mean_out, var_out);
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
// Backward. g = masked_grad(grad_out, out): grad_out * (out > 0) for relu, grad_out for none.

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
  store_block_sums(sum_g, sum_gx, c, c < g.c, s_sum_g, s_sum_gx, partial_sum_g,
                   y != nullptr ? partial_sum_g_xhat : nullptr);
}

// backward_reduce pass 2: bn_cuda::backward_reduce_finalize_kernel.

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
