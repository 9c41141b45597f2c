// CPU kernels of op bn_act_conv: the four passes of BnActConvKernels
// (csrc/common/bn_act_conv_driver.h) and the registration of _bn_act_conv_forward_native,
// _bn_act_conv_into_native and _bn_act_conv_backward_native.
//
// The CPU backend does not fuse the BN + activation into the convolution: the forward
// normalises x into a temporary z = act(x * scale + shift) in one pass and calls ATen's
// convolution (oneDNN) on it; the backward recomputes z the same way for
// at::convolution_backward. x is read through its strides, never copied when it is a
// channel-prefix view: a pass walks it either as (n, c) planes of H*W contiguous
// elements (NCHW buffers) or as (n, h, w) rows of C unit-stride channels (channels_last
// buffers); only an x that allows neither walk is first made dense. Dense tensors (z,
// grad_z, grad_x) are walked the same way. Inner loops are `omp simd` over a span; sums
// go into acc_t (float, or double for double input) over blocks of at most kBlock
// elements, and the block sums into double. The machinery shared with conv_bn_act
// (constants, reduce_rows, the shifted batch statistics) is in csrc/cpu/bn_passes.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "common/bn_act_conv_driver.h"
#include "cpu/bn_passes.h"
#include "cpu/simd_clones.h"
#include "cpu/simd_cast.h"

namespace cnnkernels {
namespace {

using namespace cpu_bn;  // kBlock, Bool, with_bool, grain, ptr_or_null, reduce_rows, ...

// Whether each (n, c) plane of t is H*W contiguous elements.
bool planes_dense(const at::Tensor& t) {
  return (t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3));
}

// Whether each (n, h, w) row of t is C unit-stride elements.
bool rows_dense(const at::Tensor& t) { return t.size(1) == 1 || t.stride(1) == 1; }

// Whether a pass over x and the dense tensor `dense` walks rows (else planes): the dense
// tensor's format decides; when it is both NCHW- and channels_last-contiguous, x does.
bool walk_rows(const at::Tensor& dense, const at::Tensor& x) {
  if (!dense.is_contiguous()) return true;
  if (!dense.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  return !planes_dense(x) && rows_dense(x);
}

// x itself when its strides allow the walk, else a dense copy that does.
at::Tensor walkable(const at::Tensor& x, bool rows) {
  if (rows ? rows_dense(x) : planes_dense(x)) return x;
  return x.contiguous(rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Offsets of the spans of a walkable x (in elements).
struct XWalk {
  int64_t n, c, h, w, hw, sn, sc, sh, sw;
  explicit XWalk(const at::Tensor& x)
      : n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), hw(x.size(2) * x.size(3)),
        sn(x.stride(0)), sc(x.stride(1)), sh(x.stride(2)), sw(x.stride(3)) {}
  int64_t rows() const { return n * hw; }
  // Whether row r starts at r * sw for every r (no gap between image rows or samples).
  bool uniform_rows() const { return sh == w * sw && (n == 1 || sn == h * sh); }
  int64_t plane(int64_t i, int64_t ch) const { return i * sn + ch * sc; }
  int64_t row(int64_t r) const {
    const int64_t i = r / hw, p = r - i * hw, y = p / w;
    return i * sn + y * sh + (p - y * w) * sw;
  }
};

// A dense tensor of a pass: x's shape and dtype, contiguous in the walk's format.
void check_dense(const at::Tensor& t, const at::Tensor& x, bool rows, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), name, " is ",
              t.scalar_type(), " ", t.sizes(), ", expected ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(rows ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(), name,
              " must be ", rows ? "channels_last" : "NCHW", "-contiguous");
}

// The pre-activation of the op, a = x * scale + shift, and the relu-masked gradient.
template <typename acc_t, typename scalar_t>
inline acc_t pre_activation(scalar_t x, acc_t scale, acc_t shift) {
  return to_acc<acc_t>(x) * scale + shift;
}

template <bool kRelu, typename acc_t, typename scalar_t>
inline acc_t masked_grad(scalar_t grad_z, scalar_t x, acc_t scale, acc_t shift) {
  const acc_t g = to_acc<acc_t>(grad_z);
  if constexpr (kRelu) return pre_activation<acc_t>(x, scale, shift) > acc_t(0) ? g : acc_t(0);
  return g;
}

// ---------------------------------------------------------------- batch statistics

template <typename scalar_t>
void batch_stats_kernel(const at::Tensor& x_in, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  check_stats_vector<acc_t>(mean, "mean");
  check_stats_vector<acc_t>(var, "var");
  const bool rows = !planes_dense(x_in) && rows_dense(x_in);
  const at::Tensor x = walkable(x_in, rows);
  const XWalk s(x);
  TORCH_CHECK(s.rows() > 0, "batch statistics need at least one value per channel");
  shifted_batch_stats(x.const_data_ptr<scalar_t>(), s, rows, mean.mutable_data_ptr<acc_t>(),
                      var.mutable_data_ptr<acc_t>());
}

void batch_stats_cpu(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_conv_batch_stats",
                                  [&] { batch_stats_kernel<scalar_t>(x, mean, var); });
}

// ---------------------------------------------------------------- z = act(x * scale + shift)

// One span; scale/shift indexed per element (rows) or constant (planes) as kPerElement says.
template <bool kPerElement, bool kRelu, typename scalar_t, typename acc_t>
inline void scale_shift_act_span(const scalar_t* x, scalar_t* z, const acc_t* scale, const acc_t* shift,
                                 int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    acc_t v = pre_activation<acc_t>(x[j], scale[kPerElement ? j : 0], shift[kPerElement ? j : 0]);
    if constexpr (kRelu) v = v > acc_t(0) ? v : acc_t(0);
    z[j] = from_acc<scalar_t>(v);
  }
}

// The spans of a pass, one call each: a plane, or `count` rows of c channels whose starts
// are x_stride elements apart in x (dense in z). The loops over spans sit inside the
// cloned functions, so that each clone inlines the span and a row costs no call, and no
// index division, of its own (rows of 64 bfloat16 channels are 8 vectors).
template <bool kRelu, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void scale_shift_act_plane(const scalar_t* x, scalar_t* z, const acc_t* scale,
                                                  const acc_t* shift, int64_t len) {
  scale_shift_act_span<false, kRelu>(x, z, scale, shift, len);
}

template <bool kRelu, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void scale_shift_act_rows(const scalar_t* x, int64_t x_stride, scalar_t* z, const acc_t* scale,
                                                 const acc_t* shift, int64_t c, int64_t count) {
  for (int64_t r = 0; r < count; ++r) scale_shift_act_span<true, kRelu>(x + r * x_stride, z + r * c, scale, shift, c);
}

template <typename scalar_t>
void scale_shift_act_kernel(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                            at::Tensor& z) {
  using acc_t = at::opmath_type<scalar_t>;
  check_stats_vector<acc_t>(scale, "scale");
  check_stats_vector<acc_t>(shift, "shift");
  const bool rows = walk_rows(z, x_in);
  check_dense(z, x_in, rows, "z");
  const at::Tensor x = walkable(x_in, rows);
  const XWalk s(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* zp = z.mutable_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sh = shift.const_data_ptr<acc_t>();
  with_bool(relu, [&](auto do_relu) {
    constexpr bool kRelu = decltype(do_relu)::value;
    if (!rows) {
      at::parallel_for(0, s.n * s.c, grain(s.hw), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t i = p / s.c, ch = p - i * s.c;
          scale_shift_act_plane<kRelu>(xp + s.plane(i, ch), zp + p * s.hw, sc + ch, sh + ch, s.hw);
        }
      });
    } else {
      at::parallel_for(0, s.rows(), grain(s.c), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1;) {  // runs of rows s.sw apart: an image row, or all when uniform
          const int64_t end = s.uniform_rows() ? r1 : std::min(r1, (r / s.w + 1) * s.w);
          scale_shift_act_rows<kRelu>(xp + s.row(r), s.sw, zp + r * s.c, sc, sh, s.c, end - r);
          r = end;
        }
      });
    }
  });
}

void scale_shift_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                         at::Tensor& z) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_conv_scale_shift_act",
                                  [&] { scale_shift_act_kernel<scalar_t>(x, scale, shift, relu, z); });
}

// The native helper _scale_shift_act_into_native (schemas.def): this op's forward pass on
// its own, for the frozen inference path (cnnkernels.nn.frozen_cpu.bn_act). z: x's shape
// and dtype, channels_last- or NCHW-contiguous; scale, shift: [C] in x's opmath dtype.
void scale_shift_act_into(at::Tensor z, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          std::string_view activation) {
  const bool relu = check_activation(activation);
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D tensor [N, C, H, W], got ", x.sizes());
  for (const auto* t : {&scale, &shift}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), t == &scale ? "scale" : "shift", " must be a 1-D tensor of C = ",
                x.size(1), " elements, got ", t->sizes());
  }
  check_written_apart(z, "z", x, "x");
  scale_shift_act_cpu(x, scale, shift, relu, z);
}

// ---------------------------------------------------------------- backward

template <typename scalar_t>
void backward_reduce_kernel(const at::Tensor& grad_z, const at::Tensor& x_in, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                            at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&scale, &shift, &sum_g}) check_stats_vector<acc_t>(*t, "per-channel tensor");
  const bool want_x = sum_g_xhat.defined();
  if (want_x) {
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&mean, &invstd, &sum_g_xhat}) check_stats_vector<acc_t>(*t, "per-channel tensor");
  }
  const bool rows = walk_rows(grad_z, x_in);
  check_dense(grad_z, x_in, rows, "grad_z");
  const at::Tensor x = walkable(x_in, rows);
  const XWalk s(x);
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* scp = scale.const_data_ptr<acc_t>();
  const acc_t* shp = shift.const_data_ptr<acc_t>();
  const acc_t* mp = want_x ? mean.const_data_ptr<acc_t>() : nullptr;
  const acc_t* isp = want_x ? invstd.const_data_ptr<acc_t>() : nullptr;
  acc_t* sgp = sum_g.mutable_data_ptr<acc_t>();
  acc_t* sxp = want_x ? sum_g_xhat.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t c = s.c;

  with_bool(relu, [&](auto do_relu) {
    with_bool(want_x, [&](auto has_x) {
      constexpr bool kRelu = decltype(do_relu)::value, kX = decltype(has_x)::value;
      if (!rows) {
        at::parallel_for(0, c, grain(s.rows()), [&](int64_t c0, int64_t c1) {
          for (int64_t ch = c0; ch < c1; ++ch) {
            const acc_t a = scp[ch], b = shp[ch], m = kX ? mp[ch] : acc_t(0);
            double sum = 0, sum_x = 0;
            for (int64_t i = 0; i < s.n; ++i) {
              const scalar_t* g = gp + (i * c + ch) * s.hw;
              const scalar_t* xv = xp + s.plane(i, ch);
              for (int64_t j0 = 0; j0 < s.hw; j0 += kBlock) {
                const int64_t len = std::min(kBlock, s.hw - j0);
                acc_t bs = 0, bx = 0;
#pragma omp simd reduction(+ : bs, bx)
                for (int64_t j = j0; j < j0 + len; ++j) {
                  const acc_t gv = masked_grad<kRelu>(g[j], xv[j], a, b);
                  bs += gv;
                  if constexpr (kX) bx += gv * (to_acc<acc_t>(xv[j]) - m);
                }
                sum += bs;
                sum_x += bx;
              }
            }
            sgp[ch] = static_cast<acc_t>(sum);
            if constexpr (kX) sxp[ch] = static_cast<acc_t>(sum_x * isp[ch]);
          }
        });
        return;
      }
      const auto total = channel_sum_pairs<acc_t>(s.rows(), c, [&](int64_t r, acc_t* bs, acc_t* bx) {
        const scalar_t* g = gp + r * c;
        const scalar_t* xv = xp + s.row(r);
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          const acc_t gv = masked_grad<kRelu>(g[ch], xv[ch], scp[ch], shp[ch]);
          bs[ch] += gv;
          if constexpr (kX) bx[ch] += gv * (to_acc<acc_t>(xv[ch]) - mp[ch]);
        }
      });
      for (int64_t ch = 0; ch < c; ++ch) {
        sgp[ch] = static_cast<acc_t>(total[ch]);
        if constexpr (kX) sxp[ch] = static_cast<acc_t>(total[c + ch] * isp[ch]);
      }
    });
  });
}

void backward_reduce_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                         at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_conv_backward_reduce", [&] {
    backward_reduce_kernel<scalar_t>(grad_z, x, scale, shift, mean, invstd, relu, sum_g, sum_g_xhat);
  });
}

// Per-channel coefficients of one span, indexed per element (rows) or constant (planes).
template <typename acc_t>
struct GradCoefs {
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;
  const acc_t* g_scale;
  const acc_t* x_scale;
  const acc_t* g_shift;
  GradCoefs at(int64_t ch) const {
    return {scale + ch, shift + ch, mean ? mean + ch : nullptr, g_scale + ch, x_scale ? x_scale + ch : nullptr,
            g_shift + ch};
  }
};

// One span: grad_x = g * g_scale - (x - mean) * x_scale + g_shift.
template <bool kPerElement, bool kRelu, bool kX, typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void backward_span(const scalar_t* grad_z, const scalar_t* x, GradCoefs<acc_t> k, scalar_t* grad_x,
                          int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const int64_t ch = kPerElement ? j : 0;
    const acc_t g = masked_grad<kRelu>(grad_z[j], x[j], k.scale[ch], k.shift[ch]);
    acc_t v = g * k.g_scale[ch] + k.g_shift[ch];
    if constexpr (kX) v -= (to_acc<acc_t>(x[j]) - k.mean[ch]) * k.x_scale[ch];
    grad_x[j] = from_acc<scalar_t>(v);
  }
}

template <typename scalar_t>
void backward_elementwise_kernel(const at::Tensor& grad_z, const at::Tensor& x_in, const at::Tensor& scale,
                                 const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& g_scale,
                                 const at::Tensor& x_scale, const at::Tensor& g_shift, bool relu,
                                 at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  for (const auto* t : {&scale, &shift, &mean, &g_scale, &x_scale, &g_shift}) {
    check_stats_vector<acc_t>(*t, "per-channel tensor");
  }
  const bool want_x = x_scale.defined();
  TORCH_CHECK(!want_x || mean.defined(), "mean is required with x_scale");
  const bool rows = walk_rows(grad_z, x_in);
  check_dense(grad_z, x_in, rows, "grad_z");
  check_dense(grad_x, x_in, rows, "grad_x");
  const at::Tensor x = walkable(x_in, rows);
  const XWalk s(x);
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = grad_x.mutable_data_ptr<scalar_t>();
  const GradCoefs<acc_t> coefs{scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
                               ptr_or_null<acc_t>(mean), g_scale.const_data_ptr<acc_t>(),
                               ptr_or_null<acc_t>(x_scale), g_shift.const_data_ptr<acc_t>()};
  with_bool(relu, [&](auto do_relu) {
    with_bool(want_x, [&](auto has_x) {
      constexpr bool kRelu = decltype(do_relu)::value, kX = decltype(has_x)::value;
      if (!rows) {
        at::parallel_for(0, s.n * s.c, grain(s.hw), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t i = p / s.c, ch = p - i * s.c;
            backward_span<false, kRelu, kX>(gp + p * s.hw, xp + s.plane(i, ch), coefs.at(ch), op + p * s.hw, s.hw);
          }
        });
      } else {
        at::parallel_for(0, s.rows(), grain(s.c), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            backward_span<true, kRelu, kX>(gp + r * s.c, xp + s.row(r), coefs, op + r * s.c, s.c);
          }
        });
      }
    });
  });
}

void backward_elementwise_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& g_scale,
                              const at::Tensor& x_scale, const at::Tensor& g_shift, bool relu, at::Tensor& grad_x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_conv_backward_elementwise", [&] {
    backward_elementwise_kernel<scalar_t>(grad_z, x, scale, shift, mean, g_scale, x_scale, g_shift, relu, grad_x);
  });
}

const BnActConvKernels& cpu_kernels() {
  static const BnActConvKernels kernels{&batch_stats_cpu, &scale_shift_act_cpu, &backward_reduce_cpu,
                                        &backward_elementwise_cpu, nullptr};
  return kernels;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  using namespace cnnkernels;
  m.impl("_bn_act_conv_forward_native", with_kernels<&bn_act_conv_forward, &cpu_kernels>);
  m.impl("_bn_act_conv_into_native", with_kernels<&bn_act_conv_into, &cpu_kernels>);
  m.impl("_bn_act_conv_backward_native", with_kernels<&bn_act_conv_backward, &cpu_kernels>);
  m.impl("_scale_shift_act_into_native", &scale_shift_act_into);
}
