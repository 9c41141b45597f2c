// CPU kernel of the native helper _max_pool2d_channels_last_native (cnnkernels/schemas.def):
// 2-D max pooling of a channels_last tensor without the int64 indices that ATen's CPU
// max_pool2d always computes (aten::max_pool2d_with_indices), for the frozen inference
// path (cnnkernels.nn.frozen_cpu.max_pool). torch's semantics: padding counts as -inf,
// a NaN in the window gives NaN, output size as in torch.nn.functional.max_pool2d
// (ceil_mode included). Each output row of C channels is the elementwise max of the
// window's input rows, an `omp simd` loop over C (float arithmetic for bfloat16/half,
// exact: max only selects); at::parallel_for over the N * H_out * W_out output rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/Pool.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/simd_cast.h"
#include "cpu/simd_clones.h"

namespace cnnkernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel_for index range, at least

// acc[c] = max(acc[c], row[c]), NaN winning as in torch's max pooling.
template <typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void max_into(acc_t* acc, const scalar_t* row, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const acc_t v = to_acc<acc_t>(row[j]);
    acc[j] = (v > acc[j] || v != v) ? v : acc[j];
  }
}

template <typename scalar_t, typename acc_t>
CNNKERNELS_SIMD_CLONES void store_row(scalar_t* out, const acc_t* acc, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) out[j] = from_acc<scalar_t>(acc[j]);
}

at::Tensor max_pool2d_channels_last(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  check_ndim(x, 4, "x");
  check_floating(x, "x");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels_last-contiguous");
  check_pair(kernel_size, 1, "kernel_size");
  check_pair(stride, 1, "stride");
  check_pair(padding, 0, "padding");
  check_pair(dilation, 1, "dilation");
  int64_t out_hw[2];
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(padding[d] * 2 <= kernel_size[d], "padding must be at most half the kernel size, got padding ",
                padding, " for kernel_size ", kernel_size);
    const int64_t in = x.size(2 + d);
    TORCH_CHECK(in + 2 * padding[d] >= dilation[d] * (kernel_size[d] - 1) + 1, "the padded input (", x.sizes(),
                ", padding ", padding, ") is smaller than the dilated kernel (", kernel_size, ", dilation ", dilation,
                ")");
    out_hw[d] = at::native::pooling_output_shape<int64_t>(in, kernel_size[d], padding[d], stride[d], dilation[d],
                                                          ceil_mode);
  }
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), oh = out_hw[0], ow = out_hw[1];
  at::Tensor out = at::empty({n, c, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "max_pool2d_channels_last", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * oh * ow, std::max<int64_t>(1, kGrain / c), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(c);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r / (oh * ow), p = r - i * oh * ow, y = p / ow, xo = p - y * ow;
        std::fill(acc.begin(), acc.end(), -std::numeric_limits<acc_t>::infinity());
        for (int64_t ky = 0; ky < kernel_size[0]; ++ky) {
          const int64_t iy = y * stride[0] - padding[0] + ky * dilation[0];
          if (iy < 0 || iy >= h) continue;
          for (int64_t kx = 0; kx < kernel_size[1]; ++kx) {
            const int64_t ix = xo * stride[1] - padding[1] + kx * dilation[1];
            if (ix < 0 || ix >= w) continue;
            max_into(acc.data(), xp + ((i * h + iy) * w + ix) * c, c);
          }
        }
        store_row(op + r * c, acc.data(), c);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("_max_pool2d_channels_last_native", &cnnkernels::max_pool2d_channels_last);
}
