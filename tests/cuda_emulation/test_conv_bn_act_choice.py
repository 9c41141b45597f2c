"""The kernel choice of the CUDA backend of conv_bn_act: the C++ rule
(csrc/common/conv_bn_act_kernel_choice.h, compiled with g++ into a tiny host library)
and its Python mirror (cnnkernels/ops/_conv_bn_act_choice.py, used by explain()) agree
on a grid of shapes; and explain() names the kernel the rule picks."""
from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

import emulation_build
from cnnkernels import _backends
from cnnkernels.ops import _conv_bn_act_choice as choice

HARNESS = "conv_bn_act_choice_harness.cpp"
DTYPES = ["float16", "bfloat16", "float32", "float64"]  # ConvBnActDtype order


@pytest.fixture(scope="module")
def lib():
    handle = ctypes.CDLL(str(emulation_build.build(HARNESS)))
    handle.conv_bn_act_kernel_choice.argtypes = [ctypes.c_int64] * 14 + [ctypes.c_int] * 3
    handle.conv_bn_act_kernel_choice.restype = ctypes.c_int
    handle.conv_bn_act_kernel_choice_name.argtypes = [ctypes.c_int]
    handle.conv_bn_act_kernel_choice_name.restype = ctypes.c_char_p
    return handle


def _grid():
    """(n, c_in, h, w, c_out, kh, kw, stride, padding, dilation, groups): around the
    borders of both specialised kernels."""
    convs = [  # (c_in, c_out, k, groups)
        (64, 256, 1, 1), (3, 5, 1, 1), (64, 64, 1, 2), (128, 128, 3, 32), (64, 64, 3, 32), (32, 96, 3, 8),
        (1024, 1024, 3, 32), (2048, 2048, 3, 32), (96, 96, 3, 32), (64, 64, 3, 1), (16, 16, 3, 16),
        (66, 66, 3, 2), (64, 66, 3, 2), (8, 8, 3, 2), (128, 128, 5, 32), (64, 64, 7, 1),
    ]
    sizes = [(1, 1, 1), (2, 7, 9), (8, 56, 56), (512, 128, 128)]  # (n, h, w); the last is over 2^30 elements
    strides = [(1, 1), (2, 2), (1, 2), (3, 3)]
    paddings = [(0, 0), (1, 1), (0, 1), (2, 2)]
    dilations = [(1, 1), (2, 2)]
    for (c_in, c_out, k, groups), (n, h, w), stride, padding, dilation in itertools.product(
            convs, sizes, strides, paddings, dilations):
        yield n, c_in, h, w, c_out, k, k, stride, padding, dilation, groups
    yield 2, 64, 8, 8, 64, 1, 3, (1, 1), (0, 1), (1, 1), 1  # non-square kernel
    yield 0, 64, 8, 8, 64, 1, 1, (1, 1), (0, 0), (1, 1), 1  # empty batch
    for c in (2 ** 15, 2 ** 15 + 1, 2 ** 16):  # weights of 2^30 elements and more (32-bit offsets)
        yield 1, c, 2, 2, c, 1, 1, (1, 1), (0, 0), (1, 1), 1
    for c, groups in ((2 ** 20, 2 ** 15), (2 ** 22, 2 ** 17)):  # grouped: 9 * 2^25 and 9 * 2^27 weights
        yield 1, c, 2, 2, c, 3, 3, (1, 1), (1, 1), (1, 1), groups


def test_python_mirror_agrees_with_the_cpp_rule(lib):
    seen = set()
    count = 0
    for n, c_in, h, w, c_out, kh, kw, stride, padding, dilation, groups in _grid():
        for (dtype_index, dtype), channels_last, tf32 in itertools.product(enumerate(DTYPES), (True, False),
                                                                            (True, False)):
            code = lib.conv_bn_act_kernel_choice(n, c_in, h, w, c_out, kh, kw, *stride, *padding, *dilation, groups,
                                                 dtype_index, int(channels_last), int(tf32))
            cpp = lib.conv_bn_act_kernel_choice_name(code).decode()
            python, why = choice.cuda_kernel(n, c_in, h, w, c_out, kh, kw, stride, padding, dilation, groups, dtype,
                                             channels_last, tf32)
            assert cpp == python, (n, c_in, h, w, c_out, kh, kw, stride, padding, dilation, groups, dtype,
                                   channels_last, tf32, why)
            seen.add(cpp)
            count += 1
    assert seen == {choice.CUDNN_EPILOGUE, choice.CONV1X1_GEMM, choice.GROUPED_CONV3X3}
    assert count > 10000


def _args(x, weight, stride, padding, groups, training=False, residual=None, activation="relu"):
    c_out = weight.shape[0]
    channel = torch.ones(c_out, dtype=x.dtype)
    return (x, weight, None, channel, channel, channel, channel, list(stride), list(padding), [1, 1], groups,
            training, 1e-5, residual, activation)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cuda_describe_names_the_chosen_kernel(training):
    """The cuda Implementation's describe (what explain() shows) names the kernel of the rule."""
    cuda = _backends.implementations("conv_bn_act")["cuda"]
    cl = torch.channels_last
    x1 = torch.randn(2, 16, 6, 6, dtype=torch.float64).contiguous(memory_format=cl)
    w1 = torch.randn(8, 16, 1, 1, dtype=torch.float64)
    xg = torch.randn(2, 128, 6, 6).contiguous(memory_format=cl)
    wg = torch.randn(128, 4, 3, 3)
    cases = [
        (_args(x1, w1, (1, 1), (0, 0), 1, training), choice.CONV1X1_GEMM),
        (_args(x1, w1, (2, 2), (0, 0), 1, training), choice.CONV1X1_GEMM),
        (_args(x1.contiguous(), w1, (1, 1), (0, 0), 1, training), choice.CUDNN_EPILOGUE),  # NCHW
        (_args(x1.half(), w1.half(), (1, 1), (0, 0), 1, training), choice.CUDNN_EPILOGUE),
        (_args(xg, wg, (1, 1), (1, 1), 32, training), choice.GROUPED_CONV3X3),
        (_args(xg.bfloat16(), wg.bfloat16(), (2, 2), (1, 1), 32, training), choice.GROUPED_CONV3X3),
        (_args(xg, torch.randn(128, 128, 3, 3), (1, 1), (1, 1), 1, training), choice.CUDNN_EPILOGUE),
    ]
    for args, expected in cases:
        text = cuda.kernel_for(args)
        assert text.startswith(expected + ":"), (expected, text)
        assert ("tile_stats_merge_kernel" in text) == (training and expected != choice.CUDNN_EPILOGUE)


def test_float32_1x1_follows_cudnn_tf32():
    """float32 1x1 convolutions take the SIMT GEMM only when cuDNN may not use TF32."""
    cuda = _backends.implementations("conv_bn_act")["cuda"]
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    args = _args(x, torch.randn(8, 16, 1, 1), (1, 1), (0, 0), 1)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert not choice.cudnn_conv_tf32()
        assert cuda.kernel_for(args).startswith(choice.CONV1X1_GEMM + ":")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert choice.cudnn_conv_tf32()
        assert cuda.kernel_for(args).startswith(choice.CUDNN_EPILOGUE + ":")
