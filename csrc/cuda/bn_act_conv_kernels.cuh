// Device code of the CUDA backend of bn_act_conv: out = conv2d(act(bn(x)), weight, bias).
//
// No torch / ATen here, so that the same source compiles under nvcc (for
// csrc/cuda/bn_act_conv.cu) and under g++ with csrc/emulation/cuda_host_emulation.h
// (for tests/cuda_emulation). Therefore: only __shared__ memory and __syncthreads()
// (no warp shuffles, no atomics, no tensor-core intrinsics), fixed-size shared arrays.
//
// Types: scalar_t is the data type (float, double, __half, __nv_bfloat16 under nvcc;
// float, double under the emulation); acc_t is the statistics and accumulation type
// (double for double data, float otherwise). Per-channel vectors are acc_t.
//
// Layout: every 4-D tensor [N, C, H, W] is taken with arbitrary element strides
// (Strides, logical order n, c, h, w): x is typically a channel-prefix view
// buf[:, :C] of a wider NCHW or NHWC buffer, and out a channel slice buf[:, c0:c0+C_out]
// of another. Nothing here requires a dense tensor.
//
// Kernels:
//   batch_stats_{partial,finalize}_kernel  per-channel mean and biased variance of x
//                        (shifted Welford per thread, Chan merge across threads/blocks).
//   conv_kernel          implicit-GEMM direct convolution (SIMT, shared-memory tiles);
//                        the prologue of its x-tile loads applies a = act(x*scale+shift),
//                        so the normalised input is never written to memory.
//   bn_act_kernel        a = act(x*scale + shift) into a temporary (backward only: ATen's
//                        convolution_backward needs a for the weight gradient).
//   backward_reduce_{partial,finalize}_kernel   sum_g, sum_g_xhat per channel, where
//                        g = grad_a * act'(x*scale + shift), recomputed from x.
//   backward_elementwise_kernel   grad_x = g*g_scale - (x - mean)*x_scale + g_shift.
// The per-pass contracts are those of BnActConvKernels in csrc/common/bn_act_conv_driver.h.
//
// Reductions are two launches (partials per block, then one thread per channel merging
// them in order) rather than atomics: deterministic, and Welford/Chan states cannot be
// combined with atomicAdd. What they share with conv_bn_act (loads and stores, launch
// shapes, Welford / Chan, the block trees, backward_reduce_finalize_kernel) is in
// csrc/cuda/bn_kernels.cuh.
#pragma once

#include <cstdint>

#include "cuda/bn_kernels.cuh"
#include "cuda/strided_walk.cuh"

namespace cnnkernels {
namespace bn_act_conv_cuda {

using namespace bn_cuda;  // kThreads, ReduceLaunch, welford_*, ... and device_io (load_acc, rounded, ...)
using namespace strided_walk;  // Shape, Strides, RowCursor, Walk, WalkCursor, ...

// CUDA's limit on gridDim.y.
constexpr int64_t kMaxGridY = 65535;

// a = act(x * scale + shift); the forward prologue, bn_act_kernel and the backward masks
// all go through this one expression, so that the relu masks agree bit for bit.
template <typename acc_t>
__device__ __forceinline__ acc_t bn_pre(acc_t x, acc_t scale, acc_t shift) {
  return x * scale + shift;
}

// ---------------------------------------------------------------------------------------
// Launch shapes (host), shared by csrc/cuda/bn_act_conv.cu and the emulation harness.

// A per-channel reduction over the N*H*W rows (bn_cuda::reduce_launch); channel_tiles
// for channel-fast tensors.
inline ReduceLaunch reduce_launch(const Shape& s, bool channel_tiles, int max_blocks) {
  return bn_cuda::reduce_launch(s.c, s.n * s.h * s.w, channel_tiles, max_blocks);
}

// ---------------------------------------------------------------------------------------
// batch_stats: per-channel mean and biased variance of x over (N, H, W).
// Welford runs on x - k[c], with k[c] = x[0, c, 0, 0] a sample of the channel: when
// |mean| >> std the shifted values are small and exact (Sterbenz), so float32 keeps its
// full relative precision on the variance.

// Pass 1. Block and grid of reduce_launch; writes partial_{mean,m2,count}[c * P + p]
// for p = blockIdx.y, P = gridDim.y (the mean is of the shifted values).
template <typename scalar_t, typename acc_t>
__global__ void batch_stats_partial_kernel(const scalar_t* __restrict__ x, Shape shape, Strides xs,
                                           acc_t* __restrict__ partial_mean, acc_t* __restrict__ partial_m2,
                                           int64_t* __restrict__ partial_count) {
  __shared__ acc_t s_mean[kThreads];
  __shared__ acc_t s_m2[kThreads];
  __shared__ int64_t s_count[kThreads];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t mean = 0, m2 = 0;
  int64_t count = 0;
  if (c < shape.c) {
    const int64_t rows = shape.n * shape.h * shape.w;
    const int64_t step = int64_t(blockDim.y) * gridDim.y;
    const int64_t first = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
    const scalar_t* x_c = x + c * xs.c;
    const acc_t k = load_acc<acc_t>(x_c);
    RowCursor cur(first, step, shape.h, shape.w);
    for (int64_t r = first; r < rows; r += step) {
      welford_add(mean, m2, count, load_acc<acc_t>(x_c + cur.offset(xs)) - k);
      cur.advance(shape.h, shape.w);
    }
  }
  store_block_welford(mean, m2, count, c, c < shape.c, s_mean, s_m2, s_count, partial_mean, partial_m2,
                      partial_count);
}

// Pass 2. One thread per channel: mean[c], biased var[c] from the P partials.
template <typename scalar_t, typename acc_t>
__global__ void batch_stats_finalize_kernel(const scalar_t* __restrict__ x, Shape shape, Strides xs,
                                            const acc_t* __restrict__ partial_mean,
                                            const acc_t* __restrict__ partial_m2,
                                            const int64_t* __restrict__ partial_count, int partials,
                                            acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < shape.c;
       c += int64_t(blockDim.x) * gridDim.x) {
    finalize_batch_stats(c, load_acc<acc_t>(x + c * xs.c), partial_mean, partial_m2, partial_count, partials,
                         mean_out, var_out);
  }
}

// ---------------------------------------------------------------------------------------
// Convolution as an implicit GEMM per group g:
//   out[m, co] = bias[co] + sum_k A[m, k] * B[k, co]
//   m = (n * H_out + ho) * W_out + wo                       (M = N * H_out * W_out rows)
//   k = (kh * kW + kw) * Cg + ci                            (K = kH * kW * Cg)
//   A[m, k] = a[n, g*Cg + ci, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw]  (0 in the padding)
//   a = act(x * scale[c] + shift[c]) rounded to scalar_t    (applied while loading A)
//   B[k, co] = weight[g*Cog + co, kh, kw, ci]               (weight in [C_out, kH, kW, Cg])
// The weight is taken permuted to [C_out, kH, kW, Cg], contiguous, so that B's column
// for one output channel is contiguous in k (the launcher permutes it once; it is small).
// k runs over the input channels fastest: a 1x1 conv reads x[n, :, h, w] in order.

struct ConvShape {
  int64_t n, m;        // batch, GEMM rows N * H_out * W_out
  int h, w;            // input spatial size
  int h_out, w_out;    // output spatial size
  int cg, cog;         // input / output channels per group
  int groups;
  int kh, kw;          // kernel size
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int k;               // GEMM depth kH * kW * Cg
};

template <typename scalar_t, typename acc_t>
struct ConvArgs {
  const scalar_t* x;      // [N, C_in, H, W], strides xs
  Strides xs;
  const acc_t* scale;     // [C_in]
  const acc_t* shift;     // [C_in]
  bool relu;
  const scalar_t* weight; // [C_out, kH, kW, Cg] contiguous
  const scalar_t* bias;   // [C_out] or null
  scalar_t* out;          // [N, C_out, H_out, W_out], strides os
  Strides os;
  ConvShape shape;
  bool out_pixel_fast;    // consecutive threads on consecutive pixels (else channels) in the epilogue
};

// Output tile BM x BN (GEMM rows x output channels) per block of 16 x 16 threads, each
// thread a TM x TN micro-tile; BK = 16 values of k per shared-memory stage.
template <int kTM, int kTN>
struct ConvTile {
  static constexpr int TM = kTM, TN = kTN;
  static constexpr int BM = 16 * kTM, BN = 16 * kTN, BK = 16;
  static_assert(BM * BK % kThreads == 0 && BN * BK % kThreads == 0, "tiles must split evenly over the block");
};
using WideTile = ConvTile<4, 4>;    // 64 x 64, C_out / groups > 16
using NarrowTile = ConvTile<8, 1>;  // 128 x 16, few output channels per group (grouped, depthwise)

// A GEMM row (output pixel) as the A loads need it: sample offset and the top-left
// input coordinate of its receptive field. Rows beyond M get h0 far below 0, so every
// tap of theirs reads as padding.
struct RowInfo {
  int64_t base;  // n * xs.n
  int h0, w0;
};

__device__ __forceinline__ RowInfo row_info(int64_t m, const ConvShape& s, const Strides& xs) {
  if (m >= s.m) return {0, -(1 << 30), 0};
  const int64_t hw = int64_t(s.h_out) * s.w_out;
  const int64_t n = m / hw;
  const int64_t rem = m - n * hw;  // int64: H_out * W_out may pass 2^31
  const int ho = static_cast<int>(rem / s.w_out);
  const int wo = static_cast<int>(rem - int64_t(ho) * s.w_out);
  return {n * xs.n, ho * s.stride_h - s.pad_h, wo * s.stride_w - s.pad_w};
}

// A GEMM depth index k = (kh * kW + kw) * Cg + ci as a cursor stepping by BK.
// kh >= kH means k >= K (past the end).
struct TapCursor {
  int ci, kh, kw;
  TapCursor() = default;
  __device__ __forceinline__ TapCursor(int k, const ConvShape& s) {
    const int r = k / s.cg;
    ci = k - r * s.cg;
    kh = r / s.kw;
    kw = r - kh * s.kw;
  }
  __device__ __forceinline__ void advance(int step_ci, int step_r, const ConvShape& s) {
    ci += step_ci;
    int dr = step_r;
    if (ci >= s.cg) {
      ci -= s.cg;
      ++dr;
    }
    kw += dr;
    while (kw >= s.kw) {
      kw -= s.kw;
      ++kh;
    }
  }
};

// One value of A: act(bn(x)) at the tap, or 0 in the padding / past K.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_a(const ConvArgs<scalar_t, acc_t>& p, const scalar_t* x_g,
                                        const acc_t* scale_g, const acc_t* shift_g, const RowInfo& row,
                                        const TapCursor& tap) {
  const ConvShape& s = p.shape;
  if (tap.kh >= s.kh) return acc_t(0);
  const int hi = row.h0 + tap.kh * s.dil_h;
  const int wi = row.w0 + tap.kw * s.dil_w;
  if (hi < 0 || hi >= s.h || wi < 0 || wi >= s.w) return acc_t(0);
  const acc_t v = load_acc<acc_t>(x_g + row.base + tap.ci * p.xs.c + hi * p.xs.h + wi * p.xs.w);
  const acc_t z = bn_pre(v, scale_g[tap.ci], shift_g[tap.ci]);
  // rounded: as the unfused path, which writes act(bn(x)) in x's dtype before the conv.
  return (p.relu && z < acc_t(0)) ? acc_t(0) : rounded<scalar_t>(z);
}

// Block: kThreads threads (16 x 16). Grid: (ceil(M / BM), groups * ceil(Cog / BN)).
// kChannelsFast picks how the block's threads split the BK x BM A-tile loads: along k
// (consecutive threads on consecutive input channels: channel-fast x) or along m
// (consecutive output pixels: NCHW-like x), so that a warp's loads coalesce.
template <typename scalar_t, typename acc_t, typename Tile, bool kChannelsFast>
__global__ void conv_kernel(ConvArgs<scalar_t, acc_t> p) {
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, TM = Tile::TM, TN = Tile::TN;
  constexpr int kALoads = BM * BK / kThreads;
  constexpr int kBLoads = BN * BK / kThreads;
  constexpr int kRows = kChannelsFast ? kALoads : 1;  // distinct GEMM rows a thread loads
  constexpr int kTaps = kChannelsFast ? 1 : kALoads;  // distinct k a thread loads per stage
  // +1: the A / B stores walk k across consecutive threads; the pad avoids bank conflicts.
  __shared__ acc_t a_tile[BK][BM + 1];
  __shared__ acc_t b_tile[BK][BN + 1];

  const ConvShape& s = p.shape;
  const int t = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int n_tiles = (s.cog + BN - 1) / BN;
  const int group = static_cast<int>(blockIdx.y) / n_tiles;
  const int co0 = (static_cast<int>(blockIdx.y) - group * n_tiles) * BN;
  const scalar_t* x_g = p.x + int64_t(group) * s.cg * p.xs.c;
  const acc_t* scale_g = p.scale + int64_t(group) * s.cg;
  const acc_t* shift_g = p.shift + int64_t(group) * s.cg;
  const scalar_t* w_g = p.weight + (int64_t(group) * s.cog + co0) * s.k;
  const int step_ci = BK % s.cg, step_r = BK / s.cg;

  // A loads: element j of this thread is (m_local, k_local) of the tile.
  auto a_m = [&](int j) { return kChannelsFast ? t / BK + (kThreads / BK) * j : t % BM; };
  auto a_k = [&](int j) { return kChannelsFast ? t % BK : t / BM + (kThreads / BM) * j; };
  RowInfo rows[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) rows[j] = row_info(m0 + a_m(j), s, p.xs);
  TapCursor taps[kTaps];
#pragma unroll
  for (int j = 0; j < kTaps; ++j) taps[j] = TapCursor(a_k(j), s);
  // B loads: k_local = t % BK, co_local = t / BK + (kThreads / BK) * j.
  const int b_k = t % BK;

  acc_t a_next[kALoads], b_next[kBLoads];
  auto fetch = [&](int k0) {
#pragma unroll
    for (int j = 0; j < kALoads; ++j) {
      a_next[j] = load_a(p, x_g, scale_g, shift_g, rows[kChannelsFast ? j : 0], taps[kChannelsFast ? 0 : j]);
    }
#pragma unroll
    for (int j = 0; j < kBLoads; ++j) {
      const int co = t / BK + (kThreads / BK) * j;
      const int k = k0 + b_k;
      b_next[j] = (co0 + co < s.cog && k < s.k) ? load_acc<acc_t>(w_g + int64_t(co) * s.k + k) : acc_t(0);
    }
  };

  // The compute mapping: this thread owns rows m_lane + 16 i and columns n_lane + 16 j.
  const int m_lane = p.out_pixel_fast ? t % 16 : t / 16;
  const int n_lane = p.out_pixel_fast ? t / 16 : t % 16;
  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);
  }

  if (s.k > 0) fetch(0);
  for (int k0 = 0; k0 < s.k; k0 += BK) {
#pragma unroll
    for (int j = 0; j < kALoads; ++j) a_tile[a_k(j)][a_m(j)] = a_next[j];
#pragma unroll
    for (int j = 0; j < kBLoads; ++j) b_tile[b_k][t / BK + (kThreads / BK) * j] = b_next[j];
    __syncthreads();
    if (k0 + BK < s.k) {  // issue the next stage's global loads before this stage's math
#pragma unroll
      for (int j = 0; j < kTaps; ++j) taps[j].advance(step_ci, step_r, s);
      fetch(k0 + BK);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][m_lane + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = b_tile[kk][n_lane + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }

  const int64_t hw = int64_t(s.h_out) * s.w_out;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + m_lane + 16 * i;
    if (m >= s.m) continue;
    const int64_t n = m / hw;
    const int64_t rem = m - n * hw;  // as in row_info
    const int ho = static_cast<int>(rem / s.w_out);
    const int wo = static_cast<int>(rem - int64_t(ho) * s.w_out);
    scalar_t* out_m = p.out + n * p.os.n + ho * p.os.h + wo * p.os.w;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int co = co0 + n_lane + 16 * j;
      if (co >= s.cog) continue;
      const int64_t c = int64_t(group) * s.cog + co;
      const acc_t b = p.bias != nullptr ? load_acc<acc_t>(p.bias + c) : acc_t(0);
      store_value(out_m + c * p.os.c, acc[i][j] + b);
    }
  }
}

// The geometry of conv2d(x [N, C_in, H, W], weight [C_out, C_in / groups, kH, kW]).
inline ConvShape conv_shape(const Shape& x, int64_t c_out, int kh, int kw, int stride_h, int stride_w, int pad_h,
                            int pad_w, int dil_h, int dil_w, int groups) {
  ConvShape s{};
  s.n = x.n;
  s.h = static_cast<int>(x.h);
  s.w = static_cast<int>(x.w);
  s.h_out = static_cast<int>((x.h + 2 * pad_h - dil_h * (kh - 1) - 1) / stride_h + 1);
  s.w_out = static_cast<int>((x.w + 2 * pad_w - dil_w * (kw - 1) - 1) / stride_w + 1);
  s.m = x.n * s.h_out * s.w_out;
  s.groups = groups;
  s.cg = static_cast<int>(x.c / groups);
  s.cog = static_cast<int>(c_out / groups);
  s.kh = kh;
  s.kw = kw;
  s.stride_h = stride_h;
  s.stride_w = stride_w;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  s.dil_h = dil_h;
  s.dil_w = dil_w;
  s.k = kh * kw * s.cg;
  return s;
}

// Which conv_kernel instantiation runs, and its grid. tile: 0 picks by C_out / groups,
// 1 forces WideTile, 2 forces NarrowTile (tests). ok is false when the grid exceeds
// CUDA's limits (the launcher reports it).
// Precondition of every launch: Cg >= 1 and M >= 1 (the launcher handles empty shapes).
enum class ConvVariant { kWideChannelsFast, kWidePixelFast, kNarrowChannelsFast, kNarrowPixelFast };

struct ConvLaunch {
  ConvVariant variant;
  dim3 grid;
  bool out_pixel_fast;
  bool ok;
};

inline ConvLaunch conv_launch(const ConvShape& s, const Shape& x_shape, const Strides& xs, const Shape& out_shape,
                              const Strides& os, int tile = 0) {
  const bool narrow = tile == 2 || (tile == 0 && s.cog <= NarrowTile::BN);
  const int bm = narrow ? NarrowTile::BM : WideTile::BM, bn = narrow ? NarrowTile::BN : WideTile::BN;
  const bool x_channels_fast = channels_fast(x_shape, xs);
  const ConvVariant variant = narrow ? (x_channels_fast ? ConvVariant::kNarrowChannelsFast : ConvVariant::kNarrowPixelFast)
                                     : (x_channels_fast ? ConvVariant::kWideChannelsFast : ConvVariant::kWidePixelFast);
  const int64_t grid_x = (s.m + bm - 1) / bm;
  const int64_t grid_y = int64_t(s.groups) * ((s.cog + bn - 1) / bn);
  const bool ok = grid_x >= 1 && grid_x <= int64_t(0x7fffffff) && grid_y >= 1 && grid_y <= kMaxGridY;
  return {variant, dim3(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(grid_y)),
          !channels_fast(out_shape, os), ok};
}

template <typename scalar_t, typename acc_t>
using ConvKernel = void (*)(ConvArgs<scalar_t, acc_t>);

// The conv_kernel instantiation of a variant (host), to launch with conv_launch's grid
// and kThreads threads.
template <typename scalar_t, typename acc_t>
inline ConvKernel<scalar_t, acc_t> conv_kernel_of(ConvVariant variant) {
  switch (variant) {
    case ConvVariant::kWideChannelsFast:
      return conv_kernel<scalar_t, acc_t, WideTile, true>;
    case ConvVariant::kWidePixelFast:
      return conv_kernel<scalar_t, acc_t, WideTile, false>;
    case ConvVariant::kNarrowChannelsFast:
      return conv_kernel<scalar_t, acc_t, NarrowTile, true>;
    default:  // kNarrowPixelFast
      return conv_kernel<scalar_t, acc_t, NarrowTile, false>;
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

// bn_act: a = act(x * scale[c] + shift[c]); x and a walked in the same order (walk).
template <typename scalar_t, typename acc_t>
__global__ void bn_act_kernel(const scalar_t* __restrict__ x, WalkStrides xs, const acc_t* __restrict__ scale,
                              const acc_t* __restrict__ shift, bool relu, Walk walk, scalar_t* __restrict__ a,
                              WalkStrides as) {
  const int64_t numel = walk.size[0] * walk.size[1] * walk.size[2] * walk.size[3];
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  WalkCursor cur(first, step, walk);
  for (int64_t i = first; i < numel; i += step) {
    const int64_t c = cur.channel(walk);
    acc_t z = bn_pre(load_acc<acc_t>(x + cur.offset(xs)), scale[c], shift[c]);
    if (relu && z < acc_t(0)) z = acc_t(0);
    store_value(a + cur.offset(as), z);
    cur.advance(walk);
  }
}

// g = grad_a where the activation passes (z > 0 for relu, everywhere for none).
template <typename acc_t>
__device__ __forceinline__ acc_t act_grad(acc_t grad_a, acc_t x, acc_t scale, acc_t shift, bool relu) {
  return (relu && !(bn_pre(x, scale, shift) > acc_t(0))) ? acc_t(0) : grad_a;
}

// backward_reduce pass 1: per channel and block,
//   sum_g = sum g,  sum_g_xhat = invstd[c] * sum g * (x - mean[c]).
// partial_sum_g_xhat may be null (not wanted; mean and invstd are not read then).
// Block and grid of reduce_launch; partials stored [C][P] as in batch_stats.
template <typename scalar_t, typename acc_t>
__global__ void backward_reduce_partial_kernel(const scalar_t* __restrict__ grad_a, Strides gs,
                                               const scalar_t* __restrict__ x, Strides xs, Shape shape,
                                               const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                               const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                               bool relu, acc_t* __restrict__ partial_sum_g,
                                               acc_t* __restrict__ partial_sum_g_xhat) {
  __shared__ acc_t s_sum_g[kThreads];
  __shared__ acc_t s_sum_gx[kThreads];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool with_xhat = partial_sum_g_xhat != nullptr;
  acc_t sum_g = 0, sum_gx = 0;
  if (c < shape.c) {
    const int64_t rows = shape.n * shape.h * shape.w;
    const int64_t step = int64_t(blockDim.y) * gridDim.y;
    const int64_t first = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
    const scalar_t* x_c = x + c * xs.c;
    const scalar_t* g_c = grad_a + c * gs.c;
    const acc_t scale_c = scale[c], shift_c = shift[c], mean_c = with_xhat ? mean[c] : acc_t(0);
    RowCursor cur(first, step, shape.h, shape.w);
    for (int64_t r = first; r < rows; r += step) {
      const acc_t xv = load_acc<acc_t>(x_c + cur.offset(xs));
      const acc_t gi = act_grad(load_acc<acc_t>(g_c + cur.offset(gs)), xv, scale_c, shift_c, relu);
      sum_g += gi;
      sum_gx += gi * (xv - mean_c);
      cur.advance(shape.h, shape.w);
    }
    if (with_xhat) sum_gx *= invstd[c];
  }
  store_block_sums(sum_g, sum_gx, c, c < shape.c, s_sum_g, s_sum_gx, partial_sum_g, partial_sum_g_xhat);
}

// backward_reduce pass 2: bn_cuda::backward_reduce_finalize_kernel.

// backward_elementwise: grad_x = g * g_scale[c] - (x - mean[c]) * x_scale[c] + g_shift[c],
// g as in backward_reduce (its mask from scale and shift). x_scale may be null (eval):
// then the x term is absent and mean is not read. Training passes, with M = N*H*W and
// k = gamma*invstd: g_scale = k, x_scale = k*invstd*sum_g_xhat/M, g_shift = -k*sum_g/M.
template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(const scalar_t* __restrict__ grad_a, WalkStrides gs,
                                            const scalar_t* __restrict__ x, WalkStrides xs, Walk walk,
                                            const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                            const acc_t* __restrict__ g_scale, const acc_t* __restrict__ g_shift,
                                            const acc_t* __restrict__ mean, const acc_t* __restrict__ x_scale,
                                            bool relu, scalar_t* __restrict__ grad_x, WalkStrides gxs) {
  const int64_t numel = walk.size[0] * walk.size[1] * walk.size[2] * walk.size[3];
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  WalkCursor cur(first, step, walk);
  for (int64_t i = first; i < numel; i += step) {
    const int64_t c = cur.channel(walk);
    const acc_t xv = load_acc<acc_t>(x + cur.offset(xs));
    const acc_t gi = act_grad(load_acc<acc_t>(grad_a + cur.offset(gs)), xv, scale[c], shift[c], relu);
    acc_t dx = gi * g_scale[c] + g_shift[c];
    if (x_scale != nullptr) dx -= (xv - mean[c]) * x_scale[c];
    store_value(grad_x + cur.offset(gxs), dx);
    cur.advance(walk);
  }
}

}  // namespace bn_act_conv_cuda
}  // namespace cnnkernels
