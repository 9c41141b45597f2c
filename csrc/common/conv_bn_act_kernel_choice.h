// Which kernel runs the convolution of conv_bn_act on the CUDA backend, by shape.
//
// Torch-free, so that the same rule compiles into csrc/cuda/conv_bn_act.cu and into the
// tests' host programs; cnnkernels/ops/_conv_bn_act_choice.py mirrors it for explain()
// and tests/cuda_emulation/test_conv_bn_act_choice.py checks that the two agree.
//
// The rule (first match wins; every kernel needs channels_last x and output):
//   conv1x1_gemm     kernel 1x1, stride 1 or 2 (same both ways), padding 0, dilation 1,
//                    groups 1; float64, or float32 when cuDNN may not use TF32 for
//                    convolutions (torch.backends.cudnn.conv.fp32_precision != "tf32"):
//                    the kernel is SIMT FMA, which loses to cuDNN's tensor cores on
//                    TF32/float16/bfloat16 (the Triton twin is the tensor-core version).
//   grouped_conv3x3  kernel 3x3, stride 1 or 2 (same both ways), padding 1, dilation 1,
//                    groups > 1 with 4 to 32 input and 4 to 32 output channels per group
//                    (ResNeXt); any dtype (cuDNN's channels_last grouped convolutions are
//                    slow whatever the dtype: pytorch issues 34977, 70954).
//   cudnn_epilogue   everything else: at::convolution (cuDNN) + the epilogue passes.
// Empty tensors and x, output or weight of more than 2^30 elements always take
// cudnn_epilogue (the specialised kernels use 32-bit element offsets, with headroom for a
// tile past the end).
#pragma once

#include <cstdint>

namespace cnnkernels {

enum class ConvBnActKernel : int { kCudnnEpilogue = 0, kConv1x1Gemm = 1, kGroupedConv3x3 = 2 };

enum class ConvBnActDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// x [n, c_in, h, w]; weight [c_out, c_in / groups, kh, kw].
struct ConvBnActShape {
  int64_t n, c_in, h, w;
  int64_t c_out, kh, kw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  ConvBnActDtype dtype;
  bool channels_last;  // x is channels_last and so is the output (output_memory_format)
  bool tf32;           // cuDNN may run float32 convolutions in TF32
};

constexpr int64_t kGroupedMinChannelsPerGroup = 4;
constexpr int64_t kGroupedMaxChannelsPerGroup = 32;
constexpr int64_t kMaxSpecialisedNumel = int64_t(1) << 30;

inline ConvBnActKernel choose_conv_bn_act_kernel(const ConvBnActShape& s) {
  constexpr ConvBnActKernel fallback = ConvBnActKernel::kCudnnEpilogue;
  if (!s.channels_last || s.n < 1 || s.c_in < 1 || s.h < 1 || s.w < 1 || s.c_out < 1 || s.groups < 1 ||
      s.c_in % s.groups != 0 || s.c_out % s.groups != 0) {
    return fallback;
  }
  if (s.stride_h != s.stride_w || (s.stride_h != 1 && s.stride_h != 2) || s.dil_h != 1 || s.dil_w != 1 ||
      s.pad_h != s.pad_w) {
    return fallback;
  }
  const int64_t h_out = (s.h + 2 * s.pad_h - (s.kh - 1) - 1) / s.stride_h + 1;
  const int64_t w_out = (s.w + 2 * s.pad_w - (s.kw - 1) - 1) / s.stride_w + 1;
  if (s.h + 2 * s.pad_h < s.kh || s.w + 2 * s.pad_w < s.kw || h_out < 1 || w_out < 1) return fallback;
  if (s.n * s.c_in * s.h * s.w > kMaxSpecialisedNumel || s.n * s.c_out * h_out * w_out > kMaxSpecialisedNumel ||
      s.c_out * (s.c_in / s.groups) * s.kh * s.kw > kMaxSpecialisedNumel) {
    return fallback;
  }
  if (s.kh == 1 && s.kw == 1 && s.pad_h == 0 && s.groups == 1) {
    const bool simt_wins = s.dtype == ConvBnActDtype::kFloat64 || (s.dtype == ConvBnActDtype::kFloat32 && !s.tf32);
    return simt_wins ? ConvBnActKernel::kConv1x1Gemm : fallback;
  }
  if (s.kh == 3 && s.kw == 3 && s.pad_h == 1 && s.groups > 1) {
    const int64_t cin_g = s.c_in / s.groups, cout_g = s.c_out / s.groups;
    const bool fits = cin_g >= kGroupedMinChannelsPerGroup && cin_g <= kGroupedMaxChannelsPerGroup &&
                      cout_g >= kGroupedMinChannelsPerGroup && cout_g <= kGroupedMaxChannelsPerGroup;
    return fits ? ConvBnActKernel::kGroupedConv3x3 : fallback;
  }
  return fallback;
}

inline const char* conv_bn_act_kernel_name(ConvBnActKernel kernel) {
  switch (kernel) {
    case ConvBnActKernel::kConv1x1Gemm:
      return "conv1x1_gemm";
    case ConvBnActKernel::kGroupedConv3x3:
      return "grouped_conv3x3";
    case ConvBnActKernel::kCudnnEpilogue:
      break;
  }
  return "cudnn_epilogue";
}

}  // namespace cnnkernels
