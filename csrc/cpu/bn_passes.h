// BatchNorm machinery shared by the CPU backends of conv_bn_act (csrc/cpu/conv_bn_act.cpp)
// and bn_act_conv (csrc/cpu/bn_act_conv.cpp): the blocking and threading constants, the
// deterministic row reduction, and the shifted batch statistics. Private to csrc/cpu.
//
// A pass walks a 4-D activation tensor as contiguous spans: (n, c) planes of H*W elements
// (NCHW) or (n, h, w) rows of C unit-stride channels (channels_last). Each op describes
// its tensors with its own walk type (dense spans, or the strides of a channel-prefix
// view); the code here takes any type with members n, c, hw, rows(), plane(i, ch) (the
// element offset of plane (i, ch)) and row(r) (that of row r). Inner loops are `omp
// simd` over a span; sums go into acc_t (float, or double for double input) over blocks
// of at most kBlock elements, and the block sums into double.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/simd_cast.h"

namespace cnnkernels {
namespace cpu_bn {

constexpr int64_t kBlock = 256;     // elements per acc_t partial sum before it goes to double
constexpr int64_t kGrain = 32768;   // elements per parallel task, at least
constexpr int64_t kMaxChunks = 64;  // fixed chunking of row reductions (deterministic)

template <bool B>
using Bool = std::integral_constant<bool, B>;

// Calls f(Bool<b>{}) so that a runtime flag becomes a compile-time one inside f.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(Bool<true>{});
  else f(Bool<false>{});
}

// The gradient reaching an activation's input: grad_out[j], zeroed where a ReLU's output
// out[j] is not positive when kRelu (out is not read otherwise).
template <bool kRelu, typename scalar_t, typename acc_t>
inline acc_t masked_grad(const scalar_t* grad_out, const scalar_t* out, int64_t j) {
  const acc_t g = to_acc<acc_t>(grad_out[j]);
  if constexpr (kRelu) return to_acc<acc_t>(out[j]) > acc_t(0) ? g : acc_t(0);
  return g;
}

// Grain of a parallel_for whose every index covers `per_index` elements.
inline int64_t grain(int64_t per_index) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, per_index)); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// An (optional) per-channel tensor in the statistics dtype acc_t.
template <typename acc_t>
void check_stats_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, name,
              " must be in the statistics dtype ", c10::CppTypeToScalarType<acc_t>::value, ", got ",
              t.scalar_type());
}

// The same, and read as a contiguous vector.
template <typename acc_t>
void check_stats_vector(const at::Tensor& t, const char* name) {
  check_stats_dtype<acc_t>(t, name);
  TORCH_CHECK(!t.defined() || t.is_contiguous(), name, " must be contiguous");
}

// Row reductions: rows [0, rows) cut into at most kMaxChunks chunks, each reduced into
// its own double partials by body(row0, row1, partials); the partials are then summed in
// chunk order, so the result does not depend on the thread count.
template <typename Body>
std::vector<double> reduce_rows(int64_t rows, int64_t c, int64_t width, const Body& body) {
  if (c == 0 || rows == 0) return std::vector<double>(width * c, 0.0);
  const int64_t per_chunk = std::max((kGrain + c - 1) / c, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  std::vector<double> partials(chunks * width * c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      body(k * per_chunk, std::min(rows, (k + 1) * per_chunk), partials.data() + k * width * c);
    }
  });
  std::vector<double> total(width * c, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < width * c; ++i) total[i] += partials[k * width * c + i];
  }
  return total;
}

// Two per-channel sums over the rows of channels-last data ([rows, c], row r at any
// offset): add_row(r, first, second) adds row r's terms to the c-wide acc_t accumulators,
// which are flushed to double every kBlock rows (each channel's acc_t partial sums kBlock
// values, as the plane walks' blocks do). Returns {first sums, second sums}
// as 2 * c doubles, through reduce_rows (thread-count independent).
template <typename acc_t, typename AddRow>
std::vector<double> channel_sum_pairs(int64_t rows, int64_t c, const AddRow& add_row) {
  return reduce_rows(rows, c, 2, [&](int64_t r0, int64_t r1, double* part) {
    std::vector<acc_t> block(2 * c);
    acc_t* first = block.data();
    acc_t* second = first + c;
    for (int64_t b0 = r0; b0 < r1; b0 += kBlock) {
      std::fill(block.begin(), block.end(), acc_t(0));
      for (int64_t r = b0; r < std::min(r1, b0 + kBlock); ++r) add_row(r, first, second);
      for (int64_t ch = 0; ch < c; ++ch) {
        part[ch] += first[ch];
        part[c + ch] += second[ch];
      }
    }
  });
}

// ---------------------------------------------------------------- batch statistics
// Per-channel mean and biased variance of the tensor at p (walked by s, by rows or by
// planes) over (N, H, W), into mean[c], var[c]. Sums of d = v - ref[c] and d*d, with
// ref[c] the first sample of channel c: shifting by a sample keeps the variance exact
// when |mean| >> std. Needs s.rows() > 0.
template <typename scalar_t, typename acc_t, typename Walk>
void shifted_batch_stats(const scalar_t* p, const Walk& s, bool rows, acc_t* mp, acc_t* vp) {
  const double count = static_cast<double>(s.rows());
  auto finish = [&](int64_t ch, acc_t ref, double sum, double sq) {
    const double m = sum / count;
    mp[ch] = static_cast<acc_t>(ref + m);
    vp[ch] = static_cast<acc_t>(std::max(sq / count - m * m, 0.0));
  };

  if (!rows) {
    at::parallel_for(0, s.c, grain(s.rows()), [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const acc_t ref = to_acc<acc_t>(p[s.plane(0, ch)]);
        double sum = 0, sq = 0;
        for (int64_t i = 0; i < s.n; ++i) {
          const scalar_t* q = p + s.plane(i, ch);
          for (int64_t j0 = 0; j0 < s.hw; j0 += kBlock) {
            const int64_t len = std::min(kBlock, s.hw - j0);
            acc_t bs = 0, bq = 0;
#pragma omp simd reduction(+ : bs, bq)
            for (int64_t j = 0; j < len; ++j) {
              const acc_t d = to_acc<acc_t>(q[j0 + j]) - ref;
              bs += d;
              bq += d * d;
            }
            sum += bs;
            sq += bq;
          }
        }
        finish(ch, ref, sum, sq);
      }
    });
    return;
  }

  const int64_t c = s.c;
  std::vector<acc_t> ref(c);
  for (int64_t ch = 0; ch < c; ++ch) ref[ch] = to_acc<acc_t>(p[s.row(0) + ch]);
  const acc_t* rp = ref.data();
  const auto total = channel_sum_pairs<acc_t>(s.rows(), c, [&](int64_t r, acc_t* bs, acc_t* bq) {
    const scalar_t* q = p + s.row(r);
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t d = to_acc<acc_t>(q[ch]) - rp[ch];
      bs[ch] += d;
      bq[ch] += d * d;
    }
  });
  for (int64_t ch = 0; ch < c; ++ch) finish(ch, rp[ch], total[ch], total[c + ch]);
}

}  // namespace cpu_bn
}  // namespace cnnkernels
