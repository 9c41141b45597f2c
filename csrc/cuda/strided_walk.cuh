// Strided 4-D walks for kernels that take tensors with arbitrary element strides (a
// channel-prefix view buf[:, :C] of a wider NCHW or NHWC buffer, a channel slice
// buf[:, c0:c0+C] as out): the shape and strides in logical order (n, c, h, w), and
// cursors that walk a flat index by a fixed step with one compare-and-carry per digit.
// Host and device code; no torch / ATen, so that it compiles under nvcc and under g++
// with csrc/emulation/cuda_host_emulation.h alike. Used by csrc/cuda/bn_act_conv_kernels.cuh.
#pragma once

#include <cstdint>

#if !defined(__CUDACC__)
#include "emulation/cuda_host_emulation.h"
#endif

namespace cnnkernels {
namespace strided_walk {

struct Shape {
  int64_t n, c, h, w;
};

// Element strides in logical order (n, c, h, w).
struct Strides {
  int64_t n, c, h, w;
};

// Whether a tensor's channels are its fastest-varying dimension (channels_last and its
// channel-prefix views): then kernels put consecutive threads on consecutive channels.
inline bool channels_fast(const Shape& s, const Strides& st) {
  if (s.c <= 1) return false;
  const int64_t pixel = s.w > 1 ? st.w : (s.h > 1 ? st.h : st.n);
  return st.c < pixel;
}

// ---------------------------------------------------------------------------------------
// Cursors: walk a flat index by a fixed step, one compare-and-carry per digit and step.

// Rows r = (n * H + h) * W + w of one channel.
struct RowCursor {
  int64_t n, h, w, step_n, step_h, step_w;
  __device__ __forceinline__ RowCursor(int64_t r, int64_t step, int64_t H, int64_t W) {
    w = r % W;
    h = (r / W) % H;
    n = r / (W * H);
    step_w = step % W;
    step_h = (step / W) % H;
    step_n = step / (W * H);
  }
  __device__ __forceinline__ int64_t offset(const Strides& s) const { return n * s.n + h * s.h + w * s.w; }
  __device__ __forceinline__ void advance(int64_t H, int64_t W) {
    w += step_w;
    h += step_h;
    n += step_n;
    if (w >= W) {
      w -= W;
      ++h;
    }
    if (h >= H) {
      h -= H;
      ++n;
    }
  }
};

// Every element of [N, C, H, W] in memory-friendly order: (n, c, h, w) when
// channels_last_order is false, (n, h, w, c) when true. Digits slowest first.
struct Walk {
  int64_t size[4];
  bool channels_last_order;
};

inline Walk make_walk(const Shape& s, bool channels_last_order) {
  return channels_last_order ? Walk{{s.n, s.h, s.w, s.c}, true} : Walk{{s.n, s.c, s.h, s.w}, false};
}

// Strides permuted into a Walk's digit order.
struct WalkStrides {
  int64_t s[4];
};

inline WalkStrides walk_strides(const Strides& st, const Walk& walk) {
  return walk.channels_last_order ? WalkStrides{{st.n, st.h, st.w, st.c}} : WalkStrides{{st.n, st.c, st.h, st.w}};
}

struct WalkCursor {
  int64_t d[4], step[4];
  __device__ __forceinline__ WalkCursor(int64_t i, int64_t stride, const Walk& walk) {
#pragma unroll
    for (int k = 3; k >= 0; --k) {
      d[k] = i % walk.size[k];
      i /= walk.size[k];
      step[k] = stride % walk.size[k];
      stride /= walk.size[k];
    }
    d[0] += i * walk.size[0];  // beyond the end: keeps d[0] growing, never read then
    step[0] += stride * walk.size[0];
  }
  __device__ __forceinline__ int64_t channel(const Walk& walk) const { return walk.channels_last_order ? d[3] : d[1]; }
  __device__ __forceinline__ int64_t offset(const WalkStrides& s) const {
    return d[0] * s.s[0] + d[1] * s.s[1] + d[2] * s.s[2] + d[3] * s.s[3];
  }
  __device__ __forceinline__ void advance(const Walk& walk) {
    int64_t carry = 0;
#pragma unroll
    for (int k = 3; k >= 1; --k) {
      d[k] += step[k] + carry;
      carry = d[k] >= walk.size[k] ? 1 : 0;
      if (carry) d[k] -= walk.size[k];
    }
    d[0] += step[0] + carry;
  }
};

}  // namespace strided_walk
}  // namespace cnnkernels
