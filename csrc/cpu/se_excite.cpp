// CPU kernels of op se_excite (Squeeze-and-Excitation gate + residual + activation) and
// the registration of _se_excite_forward_native / _se_excite_backward_native.
//
// Forward: one at::parallel_for over samples computes, per sample, the squeeze
// (mean of x over H*W), hidden = relu(fc1(squeezed)) and gate = sigmoid(fc2(hidden));
// then one fused pass writes out = act(x * gate + residual).
// Backward: one parallel_for over samples reduces d_gate[n, c] = sum_hw g * x (g =
// grad_out masked by out > 0 for relu) and runs the small FC backward of the sample
// (d_z2, d_z1, d_squeezed); the weight gradients sum over samples with two GEMMs; one
// fused pass writes grad_x = g * gate + d_squeezed / (H*W) and grad_residual = g.
//
// Activation tensors are walked as contiguous spans: NCHW as N*C planes of H*W
// elements, channels_last as N*H*W rows of C channels. All arithmetic is in acc_t
// (float, or double for double input); sums over a span go through blocks of kBlock
// acc_t values into double.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/op_args.h"
#include "common/se_excite_args.h"
#include "cpu/bn_passes.h"
#include "cpu/simd_cast.h"
#include "cpu/simd_clones.h"

namespace cnnkernels {
namespace {

using cpu_bn::Bool;
using cpu_bn::grain;
using cpu_bn::kBlock;  // elements per acc_t partial sum before it goes to double
using cpu_bn::masked_grad;
using cpu_bn::ptr_or_null;
using cpu_bn::with_bool;

// A 2-D fc weight [rows, cols] with x's dtype and device.
void check_fc_weight(const at::Tensor& w, int64_t rows, int64_t cols, const at::Tensor& x, const char* name) {
  check_defined(w, name);
  check_ndim(w, 2, name);
  check_same_dtype(x, "x", w, name);
  check_same_device(x, "x", w, name);
  TORCH_CHECK(w.size(0) == rows && w.size(1) == cols, name, " must have shape [", rows, ", ", cols, "], got ",
              w.sizes());
}

void check_fc_bias(const std::optional<at::Tensor>& b, int64_t size, const at::Tensor& x, const char* name) {
  if (!b.has_value() || !b->defined()) return;
  check_ndim(*b, 1, name);
  check_same_dtype(x, "x", *b, name);
  check_same_device(x, "x", *b, name);
  TORCH_CHECK(b->size(0) == size, name, " must have ", size, " elements, got ", b->size(0));
}

// A per-sample [N, K] tensor in the statistics dtype, contiguous.
at::Tensor per_sample(const at::Tensor& t, int64_t n, int64_t k, at::ScalarType acc, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == k, name, " must have shape [", n, ", ", k, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, name, " must be in the statistics dtype ", acc, ", got ", t.scalar_type());
  return t.contiguous();
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) sum += a[j] * b[j];
  return sum;
}

// Sum of f(j) for j in [0, len): acc_t blocks of kBlock summed into double.
template <typename acc_t, typename F>
inline double blocked_sum(int64_t len, const F& f) {
  double total = 0;
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t end = std::min(len, j0 + kBlock);
    acc_t block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t j = j0; j < end; ++j) block += f(j);
    total += block;
  }
  return total;
}

// Per-channel sums over one sample: result[c] = sum_s f(offset of (c, s)) for a sample
// whose data starts at offset 0: NCHW planes (c*S + s) or NHWC rows (s*C + c).
template <typename acc_t, typename F>
void sample_channel_sums(bool channels_last, int64_t c, int64_t s, const F& f, double* result) {
  if (!channels_last) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t base = ch * s;
      result[ch] = blocked_sum<acc_t>(s, [&](int64_t j) { return f(base + j); });
    }
    return;
  }
  std::fill(result, result + c, 0.0);
  std::vector<acc_t> block(c);
  for (int64_t r0 = 0; r0 < s; r0 += kBlock) {  // kBlock values of each channel per acc_t partial
    std::fill(block.begin(), block.end(), acc_t(0));
    acc_t* bp = block.data();
    for (int64_t r = r0; r < std::min(s, r0 + kBlock); ++r) {
      const int64_t base = r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) bp[ch] += f(base + ch);
    }
    for (int64_t ch = 0; ch < c; ++ch) result[ch] += bp[ch];
  }
}

// ---------------------------------------------------------------- forward

// out = act(x * g (+ residual)) over one span; g per element or one value for the span.
template <typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void gate_span(const scalar_t* x, const scalar_t* res, const acc_t* g, bool per_element,
                                      bool relu, scalar_t* out, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    acc_t v = to_acc<acc_t>(x[j]) * g[per_element ? j : 0];
    if (res) v += to_acc<acc_t>(res[j]);
    if (relu) v = v < acc_t(0) ? acc_t(0) : v;
    out[j] = from_acc<scalar_t>(v);
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const at::Tensor& residual, bool relu, bool channels_last,
                    at::Tensor& out, at::Tensor& squeezed, at::Tensor& hidden, at::Tensor& gate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2) * x.size(3), r = w1.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = ptr_or_null<scalar_t>(residual);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t* w1p = w1.const_data_ptr<acc_t>();
  const acc_t* w2p = w2.const_data_ptr<acc_t>();
  const acc_t* b1p = ptr_or_null<acc_t>(b1);
  const acc_t* b2p = ptr_or_null<acc_t>(b2);
  acc_t* sq = squeezed.mutable_data_ptr<acc_t>();
  acc_t* hp = hidden.mutable_data_ptr<acc_t>();
  acc_t* gp = gate.mutable_data_ptr<acc_t>();

  at::parallel_for(0, n, grain(c * s), [&](int64_t n0, int64_t n1) {
    std::vector<double> sums(c);
    for (int64_t i = n0; i < n1; ++i) {
      const scalar_t* xi = xp + i * c * s;
      sample_channel_sums<acc_t>(channels_last, c, s, [&](int64_t o) { return to_acc<acc_t>(xi[o]); },
                                 sums.data());
      acc_t* sqi = sq + i * c;
      for (int64_t ch = 0; ch < c; ++ch) sqi[ch] = static_cast<acc_t>(sums[ch] / static_cast<double>(s));
      acc_t* hi = hp + i * r;
      for (int64_t k = 0; k < r; ++k) {
        const acc_t v = dot(w1p + k * c, sqi, c) + (b1p ? b1p[k] : acc_t(0));
        hi[k] = v > acc_t(0) ? v : acc_t(0);
      }
      acc_t* gi = gp + i * c;
      for (int64_t ch = 0; ch < c; ++ch) {
        const acc_t v = dot(w2p + ch * r, hi, r) + (b2p ? b2p[ch] : acc_t(0));
        gi[ch] = acc_t(1) / (acc_t(1) + std::exp(-v));
      }
    }
  });

  if (!channels_last) {
    at::parallel_for(0, n * c, grain(s), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t off = p * s;
        gate_span(xp + off, rp ? rp + off : nullptr, gp + p, false, relu, op + off, s);
      }
    });
  } else {
    at::parallel_for(0, n * s, grain(c), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t off = row * c;
        gate_span(xp + off, rp ? rp + off : nullptr, gp + (row / s) * c, true, relu, op + off, c);
      }
    });
  }
}

// Runs forward_kernel into out (x itself allowed) with w1, b1, w2, b2 in x's opmath
// dtype; returns (squeezed, hidden, gate).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(const at::Tensor& x, const at::Tensor& w1,
                                                           const at::Tensor& b1, const at::Tensor& w2,
                                                           const at::Tensor& b2, const at::Tensor& residual, bool relu,
                                                           at::MemoryFormat fmt, at::Tensor& out) {
  const auto acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor squeezed = at::empty({x.size(0), x.size(1)}, acc_opts), hidden = at::empty({x.size(0), w1.size(0)}, acc_opts),
             gate = at::empty({x.size(0), x.size(1)}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "se_excite_forward_cpu", [&] {
    forward_kernel<scalar_t>(x, w1, b1, w2, b2, residual, relu, fmt == at::MemoryFormat::ChannelsLast, out,
                             squeezed, hidden, gate);
  });
  return {squeezed, hidden, gate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x_in, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const std::optional<at::Tensor>& residual_in, std::string_view activation) {
  const bool relu = check_activation(activation);
  const SeExciteSizes sizes = check_se_excite_x(x_in);
  const int64_t c = sizes.c;
  check_fc_weight(fc1_weight, fc1_weight.dim() == 2 ? fc1_weight.size(0) : -1, c, x_in, "fc1_weight");
  const int64_t r = fc1_weight.size(0);
  TORCH_CHECK(r >= 1, "fc1_weight must have at least one row");
  check_fc_weight(fc2_weight, c, r, x_in, "fc2_weight");
  check_fc_bias(fc1_bias, r, x_in, "fc1_bias");
  check_fc_bias(fc2_bias, c, x_in, "fc2_bias");
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor residual = like_x(residual_in, x, fmt, "residual");
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  auto to_acc = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->to(acc).contiguous() : at::Tensor();
  };
  const at::Tensor w1 = to_acc(fc1_weight), w2 = to_acc(fc2_weight), b1 = to_acc(fc1_bias), b2 = to_acc(fc2_bias);
  at::Tensor out = at::empty_like(x, x.options(), fmt);
  auto [squeezed, hidden, gate] = run_forward(x, w1, b1, w2, b2, residual, relu, fmt, out);
  return {out, squeezed, hidden, gate};
}

// The native helper _se_excite_inplace_native (schemas.def): the forward written into x
// itself (each element is read before it is written) for the frozen inference path, which
// owns x: no output to allocate and page in. The gate's weights and biases may have any
// floating dtype (they are used in x's opmath dtype, as in the op); nothing is saved.
void se_excite_inplace(at::Tensor x, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                       const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                       const std::optional<at::Tensor>& residual_in, std::string_view activation) {
  const bool relu = check_activation(activation);
  const SeExciteSizes sizes = check_se_excite_x(x);
  const int64_t c = sizes.c;
  const at::MemoryFormat fmt = output_memory_format(x);
  TORCH_CHECK(x.is_contiguous(fmt), "x must be NCHW- or channels_last-contiguous to be written in place");
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  auto gate_param = [&](const at::Tensor& t, std::vector<int64_t> shape, const char* name) {
    check_defined(t, name);
    check_floating(t, name);
    check_same_device(x, "x", t, name);
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ",
                t.sizes());
    return t.to(acc).contiguous();
  };
  TORCH_CHECK(fc1_weight.dim() == 2, "fc1_weight must be a 2-D tensor, got shape ", fc1_weight.sizes());
  const int64_t r = fc1_weight.size(0);
  TORCH_CHECK(r >= 1, "fc1_weight must have at least one row");
  const at::Tensor w1 = gate_param(fc1_weight, {r, c}, "fc1_weight"), w2 = gate_param(fc2_weight, {c, r}, "fc2_weight");
  const bool has_b1 = fc1_bias.has_value() && fc1_bias->defined(), has_b2 = fc2_bias.has_value() && fc2_bias->defined();
  const at::Tensor b1 = has_b1 ? gate_param(*fc1_bias, {r}, "fc1_bias") : at::Tensor();
  const at::Tensor b2 = has_b2 ? gate_param(*fc2_bias, {c}, "fc2_bias") : at::Tensor();
  const at::Tensor residual = like_x(residual_in, x, fmt, "residual");
  if (residual.defined()) {
    const auto overlap = at::get_overlap_status(x, residual);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Partial, "residual must not partly overlap x in memory");
  }
  run_forward(x, w1, b1, w2, b2, residual, relu, fmt, x);
}

// ---------------------------------------------------------------- backward

// The backward's per-span work, one SIMD-cloned function each (simd_clones.h), with the
// ReLU mask and the wanted outputs as template arguments so that each loop vectorises.
// g = grad_out, masked by out > 0 when kRelu (cpu_bn::masked_grad).

// NHWC row of C channels: sums[ch] += g * x.
template <bool kRelu, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void gate_grad_row(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
                                          acc_t* sums, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) sums[j] += masked_grad<kRelu, scalar_t, acc_t>(grad_out, out, j) * to_acc<acc_t>(x[j]);
}

// A piece of one NCHW plane: the sum of g * x.
template <bool kRelu, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES acc_t gate_grad_span(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
                                            int64_t len) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) sum += masked_grad<kRelu, scalar_t, acc_t>(grad_out, out, j) * to_acc<acc_t>(x[j]);
  return sum;
}

// One span: grad_x = g * gate + d_sq, grad_res = g; gate and d_sq indexed per element (NHWC
// rows) or one value for the span (NCHW planes).
template <bool kRelu, bool kPerElement, bool kGradX, bool kGradRes, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void input_grad_span(const scalar_t* grad_out, const scalar_t* out, const acc_t* gate,
                                            const acc_t* d_sq, scalar_t* grad_x, scalar_t* grad_res, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t g = masked_grad<kRelu, scalar_t, acc_t>(grad_out, out, j);
    const int64_t k = kPerElement ? j : 0;
    if constexpr (kGradX) grad_x[j] = from_acc<scalar_t>(g * gate[k] + d_sq[k]);
    if constexpr (kGradRes) grad_res[j] = from_acc<scalar_t>(g);
  }
}

// Per-channel sums of g * x over one sample (its first element at offset 0 of each pointer).
template <bool kRelu, typename scalar_t, typename acc_t>
void sample_gate_grad(bool channels_last, int64_t c, int64_t s, const scalar_t* grad_out, const scalar_t* out,
                      const scalar_t* x, double* result, acc_t* block) {
  if (!channels_last) {
    for (int64_t ch = 0; ch < c; ++ch) {
      double total = 0;
      for (int64_t j0 = ch * s; j0 < (ch + 1) * s; j0 += kBlock) {
        const int64_t len = std::min(kBlock, (ch + 1) * s - j0);
        total += gate_grad_span<kRelu, scalar_t, acc_t>(grad_out + j0, kRelu ? out + j0 : nullptr, x + j0, len);
      }
      result[ch] = total;
    }
    return;
  }
  std::fill(result, result + c, 0.0);
  for (int64_t r0 = 0; r0 < s; r0 += kBlock) {  // kBlock values of each channel per acc_t partial
    std::fill(block, block + c, acc_t(0));
    for (int64_t r = r0; r < std::min(s, r0 + kBlock); ++r) {
      const int64_t o = r * c;
      gate_grad_row<kRelu, scalar_t, acc_t>(grad_out + o, kRelu ? out + o : nullptr, x + o, block, c);
    }
    for (int64_t ch = 0; ch < c; ++ch) result[ch] += block[ch];
  }
}

template <bool kRelu, typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x, const at::Tensor& w1,
                     const at::Tensor& w2, const at::Tensor& hidden, const at::Tensor& gate, bool channels_last,
                     bool need_fc, at::Tensor& d_z2, at::Tensor& d_z1, at::Tensor& grad_x, at::Tensor& grad_res) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2) * x.size(3), r = w1.size(0);
  const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* outp = kRelu ? out.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* w1p = w1.const_data_ptr<acc_t>();
  const acc_t* w2p = w2.const_data_ptr<acc_t>();
  const acc_t* hp = hidden.const_data_ptr<acc_t>();
  const acc_t* gp = gate.const_data_ptr<acc_t>();
  const bool want_x = grad_x.defined();
  // d_squeezed / S per (n, c), only for grad_x.
  std::vector<acc_t> d_sq(want_x ? n * c : 0);

  if (need_fc) {
    acc_t* dz2p = d_z2.mutable_data_ptr<acc_t>();
    acc_t* dz1p = d_z1.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, grain(c * s), [&](int64_t n0, int64_t n1) {
      std::vector<double> sums(c);
      std::vector<acc_t> block(c), dh(r);
      for (int64_t i = n0; i < n1; ++i) {
        const int64_t base = i * c * s;
        sample_gate_grad<kRelu, scalar_t, acc_t>(channels_last, c, s, gop + base, kRelu ? outp + base : nullptr,
                                                 xp + base, sums.data(), block.data());
        const acc_t* gi = gp + i * c;
        acc_t* dz2 = dz2p + i * c;
        for (int64_t ch = 0; ch < c; ++ch) dz2[ch] = static_cast<acc_t>(sums[ch]) * gi[ch] * (acc_t(1) - gi[ch]);
        // d_hidden = d_z2 @ W2 ([C, R]): rows of W2 scaled and summed.
        std::fill(dh.begin(), dh.end(), acc_t(0));
        acc_t* dhp = dh.data();
        for (int64_t ch = 0; ch < c; ++ch) {
          const acc_t v = dz2[ch];
          const acc_t* row = w2p + ch * r;
#pragma omp simd
          for (int64_t k = 0; k < r; ++k) dhp[k] += v * row[k];
        }
        const acc_t* hi = hp + i * r;
        acc_t* dz1 = dz1p + i * r;
        for (int64_t k = 0; k < r; ++k) dz1[k] = hi[k] > acc_t(0) ? dhp[k] : acc_t(0);
        if (want_x) {
          // d_squeezed = d_z1 @ W1 ([R, C]), divided by S for the mean.
          acc_t* dsq = d_sq.data() + i * c;
          std::fill(dsq, dsq + c, acc_t(0));
          for (int64_t k = 0; k < r; ++k) {
            const acc_t v = dz1[k] / static_cast<acc_t>(s);
            const acc_t* row = w1p + k * c;
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) dsq[ch] += v * row[ch];
          }
        }
      }
    });
  }

  if (!want_x && !grad_res.defined()) return;
  scalar_t* gxp = want_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* grp = grad_res.defined() ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* dsqp = d_sq.data();
  with_bool(want_x, [&](auto gx) {
    with_bool(grp != nullptr, [&](auto gr) {
      constexpr bool kGradX = decltype(gx)::value, kGradRes = decltype(gr)::value;
      auto span = [&](auto per_element, int64_t off, int64_t coef, int64_t len) {
        input_grad_span<kRelu, decltype(per_element)::value, kGradX, kGradRes>(
            gop + off, kRelu ? outp + off : nullptr, gp + coef, kGradX ? dsqp + coef : nullptr,
            kGradX ? gxp + off : nullptr, kGradRes ? grp + off : nullptr, len);
      };
      if (!channels_last) {
        at::parallel_for(0, n * c, grain(s), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) span(Bool<false>{}, p * s, p, s);
        });
      } else {
        at::parallel_for(0, n * s, grain(c), [&](int64_t r0, int64_t r1) {
          for (int64_t row = r0; row < r1; ++row) span(Bool<true>{}, row * c, (row / s) * c, c);
        });
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& fc1_weight,
    const at::Tensor& fc2_weight, const at::Tensor& squeezed_in, const at::Tensor& hidden_in,
    const at::Tensor& gate_in, std::string_view activation, std::array<bool, 6> mask) {
  const bool relu = check_activation(activation);
  const SeExciteSizes sizes = check_se_excite_x(x_in);
  const int64_t n = sizes.n, c = sizes.c;
  check_fc_weight(fc1_weight, fc1_weight.dim() == 2 ? fc1_weight.size(0) : -1, c, x_in, "fc1_weight");
  const int64_t r = fc1_weight.size(0);
  check_fc_weight(fc2_weight, c, r, x_in, "fc2_weight");
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const SeExciteGrads grads = se_excite_backward_inputs(grad_out_in, out_in, x, fmt, relu);
  const at::Tensor &grad_out = grads.grad_out, &out = grads.out;
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const at::Tensor squeezed = per_sample(squeezed_in, n, c, acc, "squeezed");
  const at::Tensor hidden = per_sample(hidden_in, n, r, acc, "hidden");
  const at::Tensor gate = per_sample(gate_in, n, c, acc, "gate");
  const at::Tensor w1 = fc1_weight.to(acc).contiguous(), w2 = fc2_weight.to(acc).contiguous();

  const bool need_fc = mask[0] || mask[1] || mask[2] || mask[3] || mask[4];
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor d_z2 = need_fc ? at::empty({n, c}, acc_opts) : at::Tensor();
  at::Tensor d_z1 = need_fc ? at::empty({n, r}, acc_opts) : at::Tensor();
  at::Tensor grad_x = mask[0] ? at::empty_like(x, x.options(), fmt) : at::Tensor();
  at::Tensor grad_res = mask[5] ? at::empty_like(x, x.options(), fmt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "se_excite_backward_cpu", [&] {
    with_bool(relu, [&](auto do_relu) {
      backward_kernel<decltype(do_relu)::value, scalar_t>(grad_out, out, x, w1, w2, hidden, gate,
                                                          fmt == at::MemoryFormat::ChannelsLast, need_fc, d_z2, d_z1,
                                                          grad_x, grad_res);
    });
  });
  const at::Tensor empty = x.new_empty({0});
  auto cast = [&](bool wanted, auto make) { return wanted ? make().to(x.scalar_type()).contiguous() : empty; };
  return {grad_x.defined() ? grad_x : empty,
          cast(mask[1], [&] { return d_z1.t().mm(squeezed); }),
          cast(mask[2], [&] { return d_z1.sum(0); }),
          cast(mask[3], [&] { return d_z2.t().mm(hidden); }),
          cast(mask[4], [&] { return d_z2.sum(0); }),
          grad_res.defined() ? grad_res : empty};
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("_se_excite_forward_native", &cnnkernels::forward_cpu);
  m.impl("_se_excite_backward_native", &cnnkernels::backward_cpu);
  m.impl("_se_excite_inplace_native", &cnnkernels::se_excite_inplace);
}
