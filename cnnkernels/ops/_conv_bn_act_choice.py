"""Which kernel the cpu and cuda backends of conv_bn_act run for a given input, as
explain() and `python -m cnnkernels.info` report it.

cuda_kernel() mirrors csrc/common/conv_bn_act_kernel_choice.h rule for rule
(tests/cuda_emulation/test_conv_bn_act_choice.py compiles that header and checks that
the two agree over a grid of shapes). describe_cpu() follows eval_fused_conv_cpu in
csrc/cpu/conv_bn_act.cpp and the forward of csrc/common/conv_bn_act_driver.h.
Both describe functions take the schema's forward arguments (x, weight, bias, bn_weight,
bn_bias, running_mean, running_var, stride, padding, dilation, groups, training, eps,
residual, activation) and only read shapes, dtypes, layouts and flags.
"""
from __future__ import annotations

import torch

from cnnkernels import reference

CUDNN_EPILOGUE, CONV1X1_GEMM, GROUPED_CONV3X3 = "cudnn_epilogue", "conv1x1_gemm", "grouped_conv3x3"
GROUPED_MIN_CHANNELS_PER_GROUP, GROUPED_MAX_CHANNELS_PER_GROUP = 4, 32
MAX_SPECIALISED_NUMEL = 1 << 30
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}

CUDA_KERNEL_CHOICES = (
    (CONV1X1_GEMM, "1x1, stride 1/2, padding 0, groups 1, channels_last, float64 or float32 without TF32: "
                   "SIMT GEMM with the BN/residual/activation epilogue (csrc/cuda/conv1x1_bn_act_kernels.cuh)"),
    (GROUPED_CONV3X3, "3x3, stride 1/2, padding 1, 4-32 channels per group, channels_last: several whole groups "
                      "per block, same epilogue (csrc/cuda/grouped_conv_bn_act_kernels.cuh)"),
    (CUDNN_EPILOGUE, "every other convolution: cuDNN (at::convolution) + epilogue kernels "
                     "(csrc/cuda/conv_bn_act_kernels.cuh)"),
)
"""(kernel, when it runs) of the cuda backend's forward, first match wins."""

CPU_KERNEL_CHOICES = (
    ("aten_pass", "training: ATen convolution + C++ batch statistics and fused normalise/residual/activation pass"),
    ("onednn_fused", "eval float32 (bfloat16 where oneDNN supports it) with ReLU or a residual: "
                     "mkldnn._convolution_pointwise (.binary add for the residual, fused by torch only on "
                     "channels_last data, and not taken by torch for NCHW bfloat16), BN folded"),
    ("aten_folded", "eval float32/float64, no ReLU, no residual: one ATen convolution, BN folded into weight and bias"),
    ("aten_pass", "other eval: ATen convolution + fused C++ scale/shift/residual/activation pass"),
)
"""(path, when it runs) of the cpu backend's forward, first match wins."""


def cuda_kernel(n, c_in, h, w, c_out, kh, kw, stride, padding, dilation, groups, dtype: str,
                channels_last: bool, tf32: bool) -> tuple[str, str]:
    """(kernel, why) for one convolution; stride, padding, dilation are pairs, dtype a
    name of DTYPE_NAMES. Same rule as choose_conv_bn_act_kernel in C++."""
    if not channels_last:
        return CUDNN_EPILOGUE, "x is not channels_last"
    if min(n, c_in, h, w, c_out, groups) < 1 or c_in % groups or c_out % groups:
        return CUDNN_EPILOGUE, "empty tensor or channels not divisible by groups"
    if stride[0] != stride[1] or stride[0] not in (1, 2) or tuple(dilation) != (1, 1) or padding[0] != padding[1]:
        return CUDNN_EPILOGUE, "needs equal strides of 1 or 2, dilation 1 and equal paddings"
    h_out = (h + 2 * padding[0] - (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - (kw - 1) - 1) // stride[1] + 1
    if h + 2 * padding[0] < kh or w + 2 * padding[1] < kw or h_out < 1 or w_out < 1:
        return CUDNN_EPILOGUE, "the kernel does not fit the padded input"
    if n * c_in * h * w > MAX_SPECIALISED_NUMEL or n * c_out * h_out * w_out > MAX_SPECIALISED_NUMEL:
        return CUDNN_EPILOGUE, "more than 2^30 elements"
    if c_out * (c_in // groups) * kh * kw > MAX_SPECIALISED_NUMEL:
        return CUDNN_EPILOGUE, "a weight of more than 2^30 elements"
    if kh == 1 and kw == 1 and padding[0] == 0 and groups == 1:
        if dtype == "float64" or (dtype == "float32" and not tf32):
            return CONV1X1_GEMM, "1x1 convolution"
        return CUDNN_EPILOGUE, f"1x1 in {dtype}{' with TF32 allowed' if dtype == 'float32' else ''}: cuDNN's tensor cores win"
    if kh == 3 and kw == 3 and padding[0] == 1 and groups > 1:
        cin_g, cout_g = c_in // groups, c_out // groups
        lo, hi = GROUPED_MIN_CHANNELS_PER_GROUP, GROUPED_MAX_CHANNELS_PER_GROUP
        if lo <= cin_g <= hi and lo <= cout_g <= hi:
            return GROUPED_CONV3X3, "grouped 3x3 convolution"
        return CUDNN_EPILOGUE, f"grouped 3x3 needs {lo} to {hi} channels per group, got {cin_g} in / {cout_g} out"
    return CUDNN_EPILOGUE, "no specialised kernel for this kernel size, padding and groups"


def cudnn_conv_tf32() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32, as ATen's
    allowTF32CuDNN(Float32Op::CONV) decides: the first precision set among
    torch.backends.cudnn.conv, torch.backends.cudnn and torch.backends (generic)."""
    for setting in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
        precision = setting.fp32_precision
        if precision != "none":
            return precision == "tf32"
    return False


def _channels_last(x) -> bool:
    return reference.output_memory_format(x) == torch.channels_last


def describe_cuda(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                  groups, training, eps, residual, activation) -> str:
    """The kernels the cuda backend runs for this forward."""
    kernel, why = cuda_kernel(*x.shape, weight.shape[0], *weight.shape[2:], stride, padding, dilation, groups,
                              DTYPE_NAMES.get(x.dtype, str(x.dtype)), _channels_last(x), cudnn_conv_tf32())
    epilogue = ("writes conv_out and per-tile BN statistics; tile_stats_merge_kernel, then scale_shift_act_kernel "
                "normalises, adds the residual, activates" if training else
                "BN scale/shift, residual and activation in its epilogue, output written once")
    if kernel == CONV1X1_GEMM:
        return f"{CONV1X1_GEMM}: 1x1 convolution as a channels-last SIMT GEMM (conv1x1_bn_act_kernel); {epilogue}"
    if kernel == GROUPED_CONV3X3:
        return (f"{GROUPED_CONV3X3}: grouped 3x3 convolution, several whole groups per block "
                f"(grouped_conv_bn_act_kernel); {epilogue}")
    if training:
        rest = "batch_stats kernels + scale_shift_act_kernel (normalise, residual, activation)"
    elif x.dtype in (torch.float32, torch.float64) and activation == "none" and residual is None:
        rest = "BN folded into weight and bias, no extra pass"
    elif x.dtype in (torch.float32, torch.float64):
        rest = "BN folded into the weights + scale_shift_act_kernel (shift, residual, activation)"
    else:
        rest = "scale_shift_act_kernel (BN scale/shift, residual, activation)"
    return f"{CUDNN_EPILOGUE}: cuDNN convolution (at::convolution) + {rest} [no specialised kernel: {why}]"


def _onednn_can_fuse(dtype) -> bool:
    """eval_fused_conv_cpu's conditions on the dtype and torch (oneDNN enabled, op present)."""
    if not torch.backends.mkldnn.enabled or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe_cpu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                 groups, training, eps, residual, activation) -> str:
    """The path the cpu backend runs for this forward."""
    relu = activation == "relu"
    if training:
        return ("aten_pass: ATen convolution + C++ batch statistics (shifted sums) + fused normalise / residual / "
                "activation pass")
    binary_rejected = residual is not None and x.dtype == torch.bfloat16 and not _channels_last(x)
    if (relu or residual is not None) and _onednn_can_fuse(x.dtype) and not binary_rejected:
        post_ops = " + ".join((["binary add (residual)"] if residual is not None else []) + (["relu"] if relu else []))
        op = "mkldnn._convolution_pointwise" + (".binary" if residual is not None else "")
        unfused = ("; on NCHW data torch runs the .binary op unfused (convolution, then add and activation)"
                   if residual is not None and not _channels_last(x) else "")
        return f"onednn_fused: oneDNN {op} with BN folded into weight and bias, post-ops: {post_ops}{unfused}"
    folded = x.dtype in (torch.float32, torch.float64)
    if folded and not relu and residual is None:
        return "aten_folded: one ATen convolution with BN folded into weight and bias, no extra pass"
    conv = "ATen convolution with BN folded into the weights" if folded else "ATen convolution"
    return f"aten_pass: {conv} + fused C++ scale/shift / residual / activation pass"
