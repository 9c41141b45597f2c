// CPU kernels of op conv_bn_act: the four passes of ConvBnActKernels
// (csrc/common/conv_bn_act_driver.h), an optional oneDNN fused eval convolution, and
// the registration of _conv_bn_act_forward_native / _conv_bn_act_backward_native.
//
// Activation tensors are walked as contiguous spans: NCHW as N*C planes of H*W
// elements with one channel each, channels_last as N*H*W rows of C channels. Inner
// loops are `omp simd` over a span; sums go into acc_t (float, or double for double
// input) over blocks of at most kBlock elements, and the block sums into double. The
// machinery shared with bn_act_conv (constants, reduce_rows, the shifted batch
// statistics) is in csrc/cpu/bn_passes.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <vector>

#include "common/conv_bn_act_driver.h"
#include "cpu/bn_passes.h"
#include "cpu/simd_clones.h"
#include "cpu/simd_cast.h"

namespace cnnkernels {
namespace {

using namespace cpu_bn;  // kBlock, Bool, with_bool, grain, ptr_or_null, masked_grad, reduce_rows, ...

// The span structure of an activation tensor; check() asserts that another activation
// tensor of the same pass has the same shape and layout (the driver's convention).
struct Spans {
  int64_t n, c, hw;
  bool channels_last;
  at::IntArrayRef sizes;
  at::ScalarType dtype;
  explicit Spans(const at::Tensor& t)
      : n(t.size(0)), c(t.size(1)), hw(t.size(2) * t.size(3)), channels_last(!t.is_contiguous()),
        sizes(t.sizes()), dtype(t.scalar_type()) {
    check(t, "activation tensor");
  }
  int64_t rows() const { return n * hw; }
  // Element offsets of plane (i, ch) and of row r (the walk bn_passes.h takes).
  int64_t plane(int64_t i, int64_t ch) const { return (i * c + ch) * hw; }
  int64_t row(int64_t r) const { return r * c; }
  void check(const at::Tensor& t, const char* name) const {
    if (!t.defined()) return;
    TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == dtype, name, " is ", t.scalar_type(), " ", t.sizes(),
                ", expected ", dtype, " ", sizes);
    TORCH_CHECK(channels_last ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(), name,
                " must be ", channels_last ? "channels_last" : "NCHW", "-contiguous like the pass's first input");
  }
};

template <typename T>
T* mut_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------- batch statistics

template <typename scalar_t>
void batch_stats_kernel(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  check_stats_dtype<acc_t>(mean, "mean");
  check_stats_dtype<acc_t>(var, "var");
  const Spans s(y);
  TORCH_CHECK(s.rows() > 0, "batch statistics need at least one value per channel");
  shifted_batch_stats(y.const_data_ptr<scalar_t>(), s, s.channels_last, mean.mutable_data_ptr<acc_t>(),
                      var.mutable_data_ptr<acc_t>());
}

void batch_stats_cpu(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "conv_bn_act_batch_stats",
                                  [&] { batch_stats_kernel<scalar_t>(y, mean, var); });
}

// ---------------------------------------------------------------- scale, shift, activation

// One span: out = act(y * scale + shift (+ res)); scale/shift indexed per element
// (channels_last rows) or constant (NCHW planes) as kPerElement says.
template <bool kPerElement, bool kRes, bool kRelu, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void scale_shift_act_span(const scalar_t* y, const scalar_t* res, scalar_t* out,
                                 const acc_t* scale, const acc_t* shift, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    acc_t v = to_acc<acc_t>(y[j]) * scale[kPerElement ? j : 0] + shift[kPerElement ? j : 0];
    if constexpr (kRes) v += to_acc<acc_t>(res[j]);
    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;
    out[j] = from_acc<scalar_t>(v);
  }
}

template <typename scalar_t>
void scale_shift_act_kernel(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  check_stats_dtype<acc_t>(scale, "scale");
  check_stats_dtype<acc_t>(shift, "shift");
  const Spans s(y);
  s.check(residual, "residual");
  s.check(out, "out");
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const scalar_t* rp = ptr_or_null<scalar_t>(residual);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sh = shift.const_data_ptr<acc_t>();
  with_bool(residual.defined(), [&](auto has_res) {
    with_bool(relu, [&](auto do_relu) {
      constexpr bool kRes = decltype(has_res)::value, kRelu = decltype(do_relu)::value;
      if (!s.channels_last) {
        at::parallel_for(0, s.n * s.c, grain(s.hw), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t off = p * s.hw, ch = p % s.c;
            scale_shift_act_span<false, kRes, kRelu>(yp + off, kRes ? rp + off : nullptr, op + off,
                                                     sc + ch, sh + ch, s.hw);
          }
        });
      } else {
        at::parallel_for(0, s.rows(), grain(s.c), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t off = r * s.c;
            scale_shift_act_span<true, kRes, kRelu>(yp + off, kRes ? rp + off : nullptr, op + off,
                                                    sc, sh, s.c);
          }
        });
      }
    });
  });
}

void scale_shift_act_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& residual, bool relu, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "conv_bn_act_scale_shift_act",
                                  [&] { scale_shift_act_kernel<scalar_t>(y, scale, shift, residual, relu, out); });
}

// ---------------------------------------------------------------- backward

template <typename scalar_t>
void backward_reduce_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                            const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                            at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  check_stats_dtype<acc_t>(sum_g, "sum_g");
  check_stats_dtype<acc_t>(sum_g_xhat, "sum_g_xhat");
  const Spans s(grad_out);
  if (relu) s.check(out, "out");
  s.check(y, "y");
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* op = ptr_or_null<scalar_t>(out);
  const scalar_t* yp = ptr_or_null<scalar_t>(y);
  const acc_t* mp = y.defined() ? mean.const_data_ptr<acc_t>() : nullptr;
  acc_t* sgp = sum_g.mutable_data_ptr<acc_t>();
  acc_t* sxp = y.defined() ? sum_g_xhat.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t* isp = y.defined() ? invstd.const_data_ptr<acc_t>() : nullptr;
  const int64_t c = s.c;

  with_bool(relu, [&](auto do_relu) {
    with_bool(y.defined(), [&](auto has_y) {
      constexpr bool kRelu = decltype(do_relu)::value, kY = decltype(has_y)::value;
      if (!s.channels_last) {
        at::parallel_for(0, c, grain(s.rows()), [&](int64_t c0, int64_t c1) {
          for (int64_t ch = c0; ch < c1; ++ch) {
            const acc_t m = kY ? mp[ch] : acc_t(0);
            double sum = 0, sum_y = 0;
            for (int64_t i = 0; i < s.n; ++i) {
              const int64_t off = (i * c + ch) * s.hw;
              for (int64_t j0 = 0; j0 < s.hw; j0 += kBlock) {
                const int64_t len = std::min(kBlock, s.hw - j0), o = off + j0;
                acc_t bs = 0, by = 0;
#pragma omp simd reduction(+ : bs, by)
                for (int64_t j = 0; j < len; ++j) {
                  const acc_t g = masked_grad<kRelu, scalar_t, acc_t>(gp + o, op + (kRelu ? o : 0), j);
                  bs += g;
                  if constexpr (kY) by += g * (to_acc<acc_t>(yp[o + j]) - m);
                }
                sum += bs;
                sum_y += by;
              }
            }
            sgp[ch] = static_cast<acc_t>(sum);
            if constexpr (kY) sxp[ch] = static_cast<acc_t>(sum_y * isp[ch]);
          }
        });
        return;
      }
      const auto total = channel_sum_pairs<acc_t>(s.rows(), c, [&](int64_t r, acc_t* bs, acc_t* by) {
        const int64_t o = r * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          const acc_t g = masked_grad<kRelu, scalar_t, acc_t>(gp + o, op + (kRelu ? o : 0), ch);
          bs[ch] += g;
          if constexpr (kY) by[ch] += g * (to_acc<acc_t>(yp[o + ch]) - mp[ch]);
        }
      });
      for (int64_t ch = 0; ch < c; ++ch) {
        sgp[ch] = static_cast<acc_t>(total[ch]);
        if constexpr (kY) sxp[ch] = static_cast<acc_t>(total[c + ch] * isp[ch]);
      }
    });
  });
}

void backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                         const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                         at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "conv_bn_act_backward_reduce", [&] {
    backward_reduce_kernel<scalar_t>(grad_out, out, y, mean, invstd, relu, sum_g, sum_g_xhat);
  });
}

// Per-channel coefficients of one span; indexed per element or constant as kPerElement says.
template <typename acc_t>
struct GradCoefs {
  const acc_t* mean;
  const acc_t* g_scale;
  const acc_t* y_scale;
  const acc_t* shift;
};

// One span: grad_y = g*g_scale - (y - mean)*y_scale + shift, grad_pre = g.
template <bool kPerElement, bool kRelu, bool kY, bool kGradY, bool kGradPre, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void backward_span(const scalar_t* grad_out, const scalar_t* out, const scalar_t* y,
                          GradCoefs<acc_t> k, scalar_t* grad_y, scalar_t* grad_pre, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const int64_t ch = kPerElement ? j : 0;
    const acc_t g = masked_grad<kRelu, scalar_t, acc_t>(grad_out, out, j);
    if constexpr (kGradY) {
      acc_t v = g * k.g_scale[ch] + k.shift[ch];
      if constexpr (kY) v -= (to_acc<acc_t>(y[j]) - k.mean[ch]) * k.y_scale[ch];
      grad_y[j] = from_acc<scalar_t>(v);
    }
    if constexpr (kGradPre) grad_pre[j] = from_acc<scalar_t>(g);
  }
}

template <typename scalar_t>
void backward_elementwise_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                                 const at::Tensor& mean, const at::Tensor& g_scale,
                                 const at::Tensor& y_scale, const at::Tensor& shift, bool relu,
                                 at::Tensor& grad_y, at::Tensor& grad_pre) {
  using acc_t = at::opmath_type<scalar_t>;
  for (const auto* t : {&mean, &g_scale, &y_scale, &shift}) check_stats_dtype<acc_t>(*t, "coefficient");
  const Spans s(grad_out);
  if (relu) s.check(out, "out");
  s.check(y, "y");
  s.check(grad_y, "grad_y");
  s.check(grad_pre, "grad_pre");
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* op = ptr_or_null<scalar_t>(out);
  const scalar_t* yp = ptr_or_null<scalar_t>(y);
  scalar_t* gyp = mut_ptr_or_null<scalar_t>(grad_y);
  scalar_t* gpp = mut_ptr_or_null<scalar_t>(grad_pre);
  const GradCoefs<acc_t> coefs{ptr_or_null<acc_t>(mean), g_scale.const_data_ptr<acc_t>(),
                               ptr_or_null<acc_t>(y_scale), shift.const_data_ptr<acc_t>()};
  auto offset = [](GradCoefs<acc_t> k, int64_t ch) {
    return GradCoefs<acc_t>{k.mean ? k.mean + ch : nullptr, k.g_scale + ch,
                            k.y_scale ? k.y_scale + ch : nullptr, k.shift + ch};
  };
  with_bool(relu, [&](auto a) {
    with_bool(y.defined(), [&](auto b) {
      with_bool(grad_y.defined(), [&](auto c) {
        with_bool(grad_pre.defined(), [&](auto d) {
          constexpr bool kRelu = decltype(a)::value, kY = decltype(b)::value;
          constexpr bool kGradY = decltype(c)::value, kGradPre = decltype(d)::value;
          auto span = [&](auto per_element, int64_t off, GradCoefs<acc_t> k, int64_t len) {
            backward_span<decltype(per_element)::value, kRelu, kY, kGradY, kGradPre>(
                gp + off, kRelu ? op + off : nullptr, kY ? yp + off : nullptr, k,
                kGradY ? gyp + off : nullptr, kGradPre ? gpp + off : nullptr, len);
          };
          if (!s.channels_last) {
            at::parallel_for(0, s.n * s.c, grain(s.hw), [&](int64_t p0, int64_t p1) {
              for (int64_t p = p0; p < p1; ++p) span(Bool<false>{}, p * s.hw, offset(coefs, p % s.c), s.hw);
            });
          } else {
            at::parallel_for(0, s.rows(), grain(s.c), [&](int64_t r0, int64_t r1) {
              for (int64_t r = r0; r < r1; ++r) span(Bool<true>{}, r * s.c, coefs, s.c);
            });
          }
        });
      });
    });
  });
}

void backward_elementwise_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                              const at::Tensor& mean, const at::Tensor& g_scale, const at::Tensor& y_scale,
                              const at::Tensor& shift, bool relu, at::Tensor& grad_y, at::Tensor& grad_pre) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "conv_bn_act_backward_elementwise", [&] {
    backward_elementwise_kernel<scalar_t>(grad_out, out, y, mean, g_scale, y_scale, shift, relu, grad_y, grad_pre);
  });
}

// ---------------------------------------------------------------- oneDNN fused eval convolution
// torch's mkldnn::_convolution_pointwise runs the convolution with the bias, residual
// add and ReLU as oneDNN post-ops: no extra pass over the output. Looked up through the
// dispatcher and called boxed, so a torch without it (or with another signature) only
// loses the fast path. An input oneDNN rejects (c10::Error from torch's checks, or
// oneDNN's own dnnl::error) falls back to the plain path, that call only. bf16 on a
// CPU without AVX512 or AVX-NE-CONVERT always fails: where torch says so
// (mkldnn::_is_mkldnn_bf16_supported) bf16 is never tried, and where torch cannot say,
// the first bf16 failure stops the tries.

std::atomic<bool> onednn_bf16_failed{false};

// torch's own answer, asked once: 1 supported, 0 not, -1 torch has no such op.
int onednn_bf16_support() {
  static const int support = [] {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!op.has_value()) return -1;
    std::vector<c10::IValue> stack;
    try {
      op->callBoxed(&stack);
    } catch (const std::exception&) {
      return -1;
    }
    return stack.at(0).toBool() ? 1 : 0;
  }();
  return support;
}

std::optional<c10::OperatorHandle> find_onednn_op(const char* overload) {
  return c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", overload});
}

at::Tensor eval_fused_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, const at::Tensor& residual, bool relu) {
  const bool is_float = x.scalar_type() == at::kFloat, is_bf16 = x.scalar_type() == at::kBFloat16;
  if (!(is_float || (is_bf16 && onednn_bf16_support() != 0 && !onednn_bf16_failed.load())) ||
      (!relu && !residual.defined()) ||
      !at::globalContext().userEnabledMkldnn()) {
    return at::Tensor();
  }
  // torch's .binary form fails an internal assert on NCHW bfloat16 input (BinaryOps.cpp,
  // torch 2.14): not tried, rather than paying for the exception on every call.
  if (is_bf16 && residual.defined() && x.suggest_memory_format() != at::MemoryFormat::ChannelsLast) {
    return at::Tensor();
  }
  static const auto unary = find_onednn_op("");
  static const auto binary = find_onednn_op("binary");
  const auto& op = residual.defined() ? binary : unary;
  if (!op.has_value()) return at::Tensor();

  const auto fmt = x.suggest_memory_format();
  std::vector<c10::IValue> stack{x};
  if (residual.defined()) stack.emplace_back(residual);
  stack.insert(stack.end(), {weight.contiguous(fmt), bias.to(x.scalar_type()), padding.vec(), stride.vec(),
                             dilation.vec(), groups});
  const c10::IValue none, relu_attr(std::string("relu"));
  const c10::List<std::optional<at::Scalar>> no_scalars;
  if (residual.defined()) {
    stack.insert(stack.end(), {std::string("add"), none, relu ? relu_attr : none, no_scalars, none});
  } else {
    stack.insert(stack.end(), {relu_attr, no_scalars, none});
  }
  try {
    op->callBoxed(&stack);
  } catch (const c10::Error&) {
    if (is_bf16 && onednn_bf16_support() < 0) onednn_bf16_failed.store(true);
    return at::Tensor();
  } catch (const std::exception&) {
    // oneDNN's own dnnl::error is no c10::Error: torch 2.11's .binary form throws
    // "could not create a memory" for a channels_last input of 1x1 spatial size (strides
    // (C, 1, C, C); torch 2.14 takes it). An input rejected so falls back like any other.
    return at::Tensor();
  }
  return stack.at(0).toTensor();
}

const ConvBnActKernels& cpu_kernels() {
  static const ConvBnActKernels kernels{&batch_stats_cpu, &scale_shift_act_cpu, &backward_reduce_cpu,
                                        &backward_elementwise_cpu, &eval_fused_conv_cpu};
  return kernels;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  using namespace cnnkernels;
  m.impl("_conv_bn_act_forward_native", with_kernels<&conv_bn_act_forward, &cpu_kernels>);
  m.impl("_conv_bn_act_backward_native", with_kernels<&conv_bn_act_backward, &cpu_kernels>);
}
