// CPU kernel of the native helper _dense_block_frozen_native (cnnkernels/schemas.def): the
// layers of a frozen DenseNet block in one call (cnnkernels/nn/frozen_dense.py), the same
// op calls the recorded per-layer plan makes from Python, made from C++. Per layer i, on
// the block buffer buf [N, C_total, H, W] (channels_last) whose first c channels are filled:
//   z = relu(buf[:, :c] * scale[i] + shift[i])          into scratch, viewed [N, c, H, W]
//   b = mkldnn._convolution_pointwise(z, weight1[i], bias1[i], conv1..., "relu")
//   buf[:, c:c + k] = mkldnn._convolution_pointwise(b, weight2[i], bias2[i], conv2..., "none")
//   c += k
// Each layer costs one dispatcher call per kernel instead of nine Python op calls (four of
// them views), about 80 us per layer at batch 1.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "common/checks.h"

namespace cnnkernels {
namespace {

using ConvPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, std::string_view,
                                 c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>);
using ScaleShiftAct = void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::string_view);

// [pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w, groups] of a layer's convolution.
struct ConvArgs {
  explicit ConvArgs(at::IntArrayRef a, const char* name) {
    TORCH_CHECK(a.size() == 7, name, " must hold [pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w, groups], got ",
                a);
    padding = a.slice(0, 2);
    stride = a.slice(2, 2);
    dilation = a.slice(4, 2);
    groups = a[6];
  }
  at::IntArrayRef padding, stride, dilation;
  int64_t groups;
};

void dense_block_frozen(at::Tensor buf, int64_t c0, at::Tensor scratch, at::TensorList scale, at::TensorList shift,
                        at::TensorList weight1, const c10::List<std::optional<at::Tensor>>& bias1,
                        at::TensorList weight2, const c10::List<std::optional<at::Tensor>>& bias2,
                        at::IntArrayRef conv1_args, at::IntArrayRef conv2_args) {
  static const auto conv = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                               .typed<ConvPointwise>();
  static const auto scale_shift_act = c10::Dispatcher::singleton()
                                          .findSchemaOrThrow("cnnkernels::_scale_shift_act_into_native", "")
                                          .typed<ScaleShiftAct>();
  check_ndim(buf, 4, "buf");
  TORCH_CHECK(buf.is_contiguous(at::MemoryFormat::ChannelsLast), "buf must be channels_last-contiguous");
  const int64_t layers = static_cast<int64_t>(weight1.size());
  TORCH_CHECK(static_cast<int64_t>(scale.size()) == layers && static_cast<int64_t>(shift.size()) == layers &&
                  static_cast<int64_t>(bias1.size()) == layers && static_cast<int64_t>(weight2.size()) == layers &&
                  static_cast<int64_t>(bias2.size()) == layers,
              "scale, shift, weight1, bias1, weight2 and bias2 must have one entry per layer, got ", scale.size(), ", ",
              shift.size(), ", ", layers, ", ", bias1.size(), ", ", weight2.size(), ", ", bias2.size());
  const ConvArgs first(conv1_args, "conv1_args"), second(conv2_args, "conv2_args");
  const int64_t n = buf.size(0), total = buf.size(1), h = buf.size(2), w = buf.size(3);
  TORCH_CHECK(c0 > 0 && c0 <= total, "c0 must be in [1, ", total, "], got ", c0);
  TORCH_CHECK(scratch.dim() == 1 && scratch.is_contiguous() && scratch.scalar_type() == buf.scalar_type(),
              "scratch must be a contiguous 1-D tensor of buf's dtype");
  int64_t c = c0;
  for (int64_t i = 0; i < layers; ++i) {  // every check before the first write
    TORCH_CHECK(scratch.numel() >= n * c * h * w, "scratch holds ", scratch.numel(), " elements, layer ", i, " needs ",
                n * c * h * w);
    const int64_t k = weight2[i].size(0);
    TORCH_CHECK(c + k <= total, "layer ", i, " adds ", k, " channels to ", c, ": more than buf's ", total);
    c += k;
  }
  const c10::List<std::optional<at::Scalar>> no_scalars;
  c = c0;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor z = scratch.narrow(0, 0, n * c * h * w).view({n, h, w, c}).permute({0, 3, 1, 2});
    scale_shift_act.call(z, buf.narrow(1, 0, c), scale[i], shift[i], "relu");
    const at::Tensor bottleneck = conv.call(z, weight1[i], bias1.get(i), first.padding, first.stride, first.dilation,
                                            first.groups, "relu", no_scalars, std::nullopt);
    const at::Tensor grown = conv.call(bottleneck, weight2[i], bias2.get(i), second.padding, second.stride,
                                       second.dilation, second.groups, "none", no_scalars, std::nullopt);
    const int64_t k = grown.size(1);
    buf.narrow(1, c, k).copy_(grown);
    c += k;
  }
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("_dense_block_frozen_native", &cnnkernels::dense_block_frozen);
}

// The weights are oneDNN-packed (opaque MkldnnCPU tensors), which makes the dispatcher look
// for this key first.
TORCH_LIBRARY_IMPL(cnnkernels, MkldnnCPU, m) {
  m.impl("_dense_block_frozen_native", &cnnkernels::dense_block_frozen);
}
