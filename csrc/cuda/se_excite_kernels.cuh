// Device code of the CUDA backend of se_excite (Squeeze-and-Excitation gate + residual
// + activation), forward and backward.
//
// No torch / ATen here, so that the same source compiles under nvcc (for
// csrc/cuda/se_excite.cu) and under g++ with csrc/emulation/cuda_host_emulation.h (for
// tests/cuda_emulation). Therefore: only __shared__ memory and __syncthreads() for block
// reductions (no warp shuffles, no atomics), fixed-size shared arrays, blockDim.x ==
// kThreads for the per-sample kernels.
//
// Types: scalar_t is the data type of x and of the fc parameters (float, double, __half,
// __nv_bfloat16 under nvcc; float, double under the emulation); acc_t is the statistics
// type (double for double data, float otherwise): squeezed, hidden, gate and the
// backward's per-sample buffers are acc_t.
//
// Layout: x [N, C, H, W] is dense NCHW or NHWC (channels_last); sample n starts at
// n * C * S (S = H * W) and element (c, s) of a sample lies at c * S + s (NCHW) or
// s * C + c (NHWC). All activation tensors of one launch share that layout.
//
// Kernels:
//   squeeze_gate_kernel      one block per sample (grid-stride over samples): squeezed =
//                            mean_s x, hidden = relu(W1 squeezed + b1), gate =
//                            sigmoid(W2 hidden + b2), each stage a set of block
//                            reductions (block_sums) into global memory, separated by
//                            __syncthreads().
//   scale_kernel             out = act(x * gate[n, c] + residual), elementwise.
//   backward_sample_kernel   one block per sample: d_z2 = (sum_s g x) gate (1 - gate),
//                            d_z1 = (W2^T d_z2) * (hidden > 0), d_sq = (W1^T d_z1) / S.
//   weight_grad_kernel       grad_w[i, j] = sum_n a[n, i] b[n, j], grad_b[i] = sum_n a[n, i]
//                            (one thread per output element, samples summed in order:
//                            deterministic).
//   backward_elementwise_kernel  grad_x = g gate + d_sq, grad_residual = g.
#pragma once

#include <cstdint>

#include "cuda/device_io.cuh"

namespace cnnkernels {
namespace se_excite_cuda {

using namespace device_io;  // load_acc, store_value, exp_value, masked_grad, grid_stride_blocks

// Threads per block of every kernel; the reduction trees rely on it being a power of two.
constexpr int kThreads = 256;
// Grid y of the elementwise kernels is capped at CUDA's limit; they loop over the rest.
constexpr int64_t kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------
// Geometry and launch shapes, shared by csrc/cuda/se_excite.cu and the emulation harness.

struct Geometry {
  int64_t n, c, s;
  bool channels_last;
  __host__ __device__ int64_t per_sample() const { return c * s; }
  // Offset of (c, s) inside a sample.
  __host__ __device__ int64_t offset(int64_t ch, int64_t px) const {
    return channels_last ? px * c + ch : ch * s + px;
  }
  // Channel of offset j inside a sample.
  __host__ __device__ int64_t channel(int64_t j) const { return channels_last ? j % c : j / s; }
};

// Smallest power of two >= v, at most kThreads (at least 1).
__host__ __device__ inline int pow2_threads(int64_t v) {
  int p = 1;
  while (p < kThreads && p < v) p *= 2;
  return p;
}

// Grid of the per-sample kernels: one block per sample, at most max_blocks (loop over the rest).
inline dim3 sample_grid(int64_t n, int max_blocks) {
  int64_t blocks = n < max_blocks ? n : max_blocks;
  if (blocks < 1) blocks = 1;
  return dim3(static_cast<unsigned int>(blocks));
}

// Grid of the elementwise kernels: (blocks over a sample's C*S elements, samples).
inline dim3 elementwise_grid(const Geometry& g, int max_blocks) {
  const int64_t y = g.n < kMaxGridY ? (g.n < 1 ? 1 : g.n) : kMaxGridY;
  int64_t x = (g.per_sample() + kThreads - 1) / kThreads;
  int64_t cap = max_blocks / y;
  if (cap < 1) cap = 1;
  if (x > cap) x = cap;
  if (x < 1) x = 1;
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(y));
}

// Grid of weight_grad_kernel for `outputs` elements.
inline dim3 flat_grid(int64_t outputs, int max_blocks) { return grid_stride_blocks(outputs, kThreads, max_blocks); }

// ---------------------------------------------------------------------------------------
// Block reduction: for every item in [0, items), the sum of f(item, j) over j in
// [0, length), handed to done(item, sum) by one thread. `group` threads (a power of two
// dividing kThreads) share an item, kThreads / group items go per pass. j_fastest: the
// threads of a group are consecutive (consecutive j read by consecutive threads: for
// data contiguous in j); otherwise consecutive threads take consecutive items (for data
// contiguous in the item index). Every thread of the block must call it; it ends with
// __syncthreads(), so global writes made by done() are visible to the whole block.
template <typename acc_t, typename F, typename D>
__device__ __forceinline__ void block_sums(int64_t items, int64_t length, bool j_fastest, acc_t* s_red,
                                           const F& f, const D& done) {
  const int tid = threadIdx.x;
  const int group = j_fastest ? pow2_threads(length) : kThreads / pow2_threads(items);
  const int per_pass = kThreads / group;
  const int lane_j = j_fastest ? tid % group : tid / per_pass;
  const int lane_i = j_fastest ? tid / group : tid % per_pass;
  const int slot = lane_i * group + lane_j;
  for (int64_t i0 = 0; i0 < items; i0 += per_pass) {
    const int64_t item = i0 + lane_i;
    acc_t sum = 0;
    if (item < items) {
      for (int64_t j = lane_j; j < length; j += group) sum += f(item, j);
    }
    s_red[slot] = sum;
    __syncthreads();
    for (int half = group / 2; half > 0; half /= 2) {
      if (lane_j < half) s_red[slot] += s_red[slot + half];
      __syncthreads();
    }
    if (lane_j == 0 && item < items) done(item, s_red[slot]);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Forward.

// Block b handles samples b, b + gridDim.x, ...; writes squeezed [N, C], hidden [N, R],
// gate [N, C] (acc_t, contiguous). b1 / b2 may be null (no bias). w1 [R, C], w2 [C, R]
// contiguous.
template <typename scalar_t, typename acc_t>
__global__ void squeeze_gate_kernel(const scalar_t* __restrict__ x, Geometry g, const scalar_t* __restrict__ w1,
                                    const scalar_t* __restrict__ b1, const scalar_t* __restrict__ w2,
                                    const scalar_t* __restrict__ b2, int64_t r, acc_t* __restrict__ squeezed,
                                    acc_t* __restrict__ hidden, acc_t* __restrict__ gate) {
  __shared__ acc_t s_red[kThreads];
  const int64_t c = g.c;
  const acc_t inv_s = acc_t(1) / static_cast<acc_t>(g.s);
  for (int64_t n = blockIdx.x; n < g.n; n += gridDim.x) {
    const scalar_t* xn = x + n * g.per_sample();
    acc_t* sq = squeezed + n * c;
    acc_t* h = hidden + n * r;
    acc_t* gt = gate + n * c;
    block_sums<acc_t>(
        c, g.s, !g.channels_last, s_red,
        [&](int64_t ch, int64_t px) { return load_acc<acc_t>(xn + g.offset(ch, px)); },
        [&](int64_t ch, acc_t sum) { sq[ch] = sum * inv_s; });
    block_sums<acc_t>(
        r, c, true, s_red, [&](int64_t k, int64_t ch) { return load_acc<acc_t>(w1 + k * c + ch) * sq[ch]; },
        [&](int64_t k, acc_t sum) {
          const acc_t v = sum + (b1 != nullptr ? load_acc<acc_t>(b1 + k) : acc_t(0));
          h[k] = v > acc_t(0) ? v : acc_t(0);
        });
    block_sums<acc_t>(
        c, r, true, s_red, [&](int64_t ch, int64_t k) { return load_acc<acc_t>(w2 + ch * r + k) * h[k]; },
        [&](int64_t ch, acc_t sum) {
          const acc_t v = sum + (b2 != nullptr ? load_acc<acc_t>(b2 + ch) : acc_t(0));
          gt[ch] = acc_t(1) / (acc_t(1) + exp_value(-v));
        });
  }
}

// out = act(x * gate[n, c] + residual); residual may be null. Grid (x, y) of
// elementwise_grid: blockIdx.y walks samples, blockIdx.x a sample's elements.
template <typename scalar_t, typename acc_t>
__global__ void scale_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ gate,
                             const scalar_t* __restrict__ residual, Geometry g, bool relu,
                             scalar_t* __restrict__ out) {
  const int64_t per = g.per_sample();
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t n = blockIdx.y; n < g.n; n += gridDim.y) {
    const int64_t base = n * per;
    const acc_t* gt = gate + n * g.c;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < per; j += step) {
      acc_t z = load_acc<acc_t>(x + base + j) * gt[g.channel(j)];
      if (residual != nullptr) z += load_acc<acc_t>(residual + base + j);
      if (relu && z < acc_t(0)) z = acc_t(0);
      store_value(out + base + j, z);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward. g = masked_grad(grad_out, out): grad_out * (out > 0) for relu, grad_out for none.

// One block per sample (grid-stride over samples). Writes d_z2 [N, C], d_z1 [N, R] and,
// when d_sq is not null, d_sq [N, C] = (d_z1 W1) / S (acc_t, contiguous). out is read
// only for relu.
template <typename scalar_t, typename acc_t>
__global__ void backward_sample_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                       const scalar_t* __restrict__ x, Geometry g, const scalar_t* __restrict__ w1,
                                       const scalar_t* __restrict__ w2, int64_t r, const acc_t* __restrict__ hidden,
                                       const acc_t* __restrict__ gate, bool relu, acc_t* __restrict__ d_z2,
                                       acc_t* __restrict__ d_z1, acc_t* __restrict__ d_sq) {
  __shared__ acc_t s_red[kThreads];
  const int64_t c = g.c;
  const acc_t inv_s = acc_t(1) / static_cast<acc_t>(g.s);
  for (int64_t n = blockIdx.x; n < g.n; n += gridDim.x) {
    const int64_t base = n * g.per_sample();
    const acc_t* gt = gate + n * c;
    const acc_t* h = hidden + n * r;
    acc_t* dz2 = d_z2 + n * c;
    acc_t* dz1 = d_z1 + n * r;
    block_sums<acc_t>(
        c, g.s, !g.channels_last, s_red,
        [&](int64_t ch, int64_t px) {
          const int64_t i = base + g.offset(ch, px);
          return masked_grad<scalar_t, acc_t>(grad_out, out, i, relu) * load_acc<acc_t>(x + i);
        },
        [&](int64_t ch, acc_t sum) { dz2[ch] = sum * gt[ch] * (acc_t(1) - gt[ch]); });
    // d_hidden[k] = sum_c d_z2[c] W2[c, k]: W2 is contiguous in k, so threads take consecutive k.
    block_sums<acc_t>(
        r, c, false, s_red, [&](int64_t k, int64_t ch) { return dz2[ch] * load_acc<acc_t>(w2 + ch * r + k); },
        [&](int64_t k, acc_t sum) { dz1[k] = h[k] > acc_t(0) ? sum : acc_t(0); });
    if (d_sq != nullptr) {
      acc_t* dsq = d_sq + n * c;
      block_sums<acc_t>(
          c, r, false, s_red, [&](int64_t ch, int64_t k) { return dz1[k] * load_acc<acc_t>(w1 + k * c + ch); },
          [&](int64_t ch, acc_t sum) { dsq[ch] = sum * inv_s; });
    }
  }
}

// grad_w[i, j] = sum_n a[n, i] * b[n, j] (when grad_w is not null) and grad_b[i] =
// sum_n a[n, i] (when grad_b is not null); a [N, I], b [N, J] contiguous acc_t.
// One thread per output element (grid-stride), samples summed in order.
template <typename out_t, typename acc_t>
__global__ void weight_grad_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n,
                                   int64_t ni, int64_t nj, out_t* __restrict__ grad_w, out_t* __restrict__ grad_b) {
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (grad_w != nullptr) {
    for (int64_t e = first; e < ni * nj; e += step) {
      const int64_t i = e / nj, j = e % nj;
      acc_t sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += a[k * ni + i] * b[k * nj + j];
      store_value(grad_w + e, sum);
    }
  }
  if (grad_b != nullptr) {
    for (int64_t i = first; i < ni; i += step) {
      acc_t sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += a[k * ni + i];
      store_value(grad_b + i, sum);
    }
  }
}

// grad_x = g * gate[n, c] + d_sq[n, c], grad_residual = g; either output may be null
// (d_sq is read only for grad_x). Grid as scale_kernel.
template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                            const acc_t* __restrict__ gate, const acc_t* __restrict__ d_sq,
                                            Geometry g, bool relu, scalar_t* __restrict__ grad_x,
                                            scalar_t* __restrict__ grad_res) {
  const int64_t per = g.per_sample();
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t n = blockIdx.y; n < g.n; n += gridDim.y) {
    const int64_t base = n * per;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < per; j += step) {
      const acc_t gi = masked_grad<scalar_t, acc_t>(grad_out, out, base + j, relu);
      if (grad_x != nullptr) {
        const int64_t k = n * g.c + g.channel(j);
        store_value(grad_x + base + j, gi * gate[k] + d_sq[k]);
      }
      if (grad_res != nullptr) store_value(grad_res + base + j, gi);
    }
  }
}

}  // namespace se_excite_cuda
}  // namespace cnnkernels
