"""The 1x1 convolution GEMM of conv_bn_act (csrc/cuda/conv1x1_bn_act_kernels.cuh) and the
tile-statistics merge (conv_bn_act_tile_epilogue.cuh, also tested alone), run on the CPU through the host
emulation and checked against torch in float64: the eval epilogue (folded BN scale /
shift, residual, ReLU) and the training outputs (conv_out, per-tile partial statistics,
merged batch statistics). Every buffer the kernels write starts as NaN (counts as -1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import emulation_build
from tile_stats_reference import (DTYPE_IDS, DTYPES, I64, INT, P, check_training, eval_cases, eval_reference,
                                  nan_like, rel, run, tol, training_buffers)

HARNESS = "conv1x1_bn_act_harness.cpp"
SIGNATURES = {"conv1x1_bn_act": [P, P, I64, I64, I64, I64, I64, I64, INT, P, P, P, INT, P, P, P, P, P, P, P, P],
              "tile_stats_merge": [P, P, P, I64, I64, INT, INT, P, P]}
TILE = 64  # pixels per tile

# (n, c_in, h, w, c_out, stride)
SHAPES = [
    (2, 5, 6, 7, 9, 1),     # 84 pixels: a full and a partial tile; C_in < one K step
    (1, 37, 9, 9, 70, 2),   # C_in 37: three K steps, the last partial; C_out 70: two channel tiles
    (3, 16, 5, 6, 64, 1),   # exact K step and channel tile, 90 pixels
    (2, 3, 1, 1, 5, 1),     # 1x1 images
]
SHAPE_IDS = ["small", "k37_c70_s2", "exact", "hw1"]


@pytest.fixture(scope="module")
def lib():
    handle = emulation_build.load(HARNESS, SIGNATURES)
    handle.conv1x1_partials.argtypes = [I64] * 6
    handle.conv1x1_partials.restype = I64
    return handle


def _inputs(shape, dtype, with_residual, offset=0.0):
    n, c_in, h, w, c_out, stride = shape
    x = torch.randn(n, c_in, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, dtype=dtype) * c_in ** -0.5
    conv = F.conv2d(x.double(), weight.double().view(c_out, c_in, 1, 1), stride=stride) + offset
    residual = torch.randn(conv.shape, dtype=dtype).contiguous(memory_format=torch.channels_last) \
        if with_residual else None
    return x, weight, conv, residual


@pytest.mark.parametrize("shape,with_residual,relu,dtype", eval_cases(SHAPES, SHAPE_IDS))
def test_eval(lib, shape, with_residual, relu, dtype):
    n, c_in, h, w, c_out, stride = shape
    x, weight, conv, residual = _inputs(shape, dtype, with_residual)
    scale, shift = torch.randn(c_out, dtype=dtype), torch.randn(c_out, dtype=dtype)
    out = nan_like(conv.to(dtype).contiguous(memory_format=torch.channels_last))
    run(lib, "conv1x1_bn_act", dtype, x, weight, n, c_in, h, w, c_out, stride, 0, scale, shift, residual,
        int(relu), out, None, None, None, None, None, None, None)
    assert rel(out, eval_reference(conv, scale, shift, residual, relu)) < tol(dtype)


def _training(lib, shape, dtype, with_bias, offset=0.0):
    n, c_in, h, w, c_out, stride = shape
    x, weight, conv, _ = _inputs(shape, dtype, False)
    bias = torch.randn(c_out, dtype=dtype) + offset if with_bias else None
    pixels = n * conv.shape[2] * conv.shape[3]
    tiles = lib.conv1x1_partials(n, c_in, h, w, c_out, stride)
    assert tiles == -(-pixels // TILE)
    y = nan_like(conv.to(dtype).contiguous(memory_format=torch.channels_last))
    partial_mean, partial_m2, partial_count, mean, var = training_buffers(c_out, tiles, dtype)
    run(lib, "conv1x1_bn_act", dtype, x, weight, n, c_in, h, w, c_out, stride, 1, None, None, None, 0, None,
        bias, y, partial_mean, partial_m2, partial_count, mean, var)
    ref_y = conv + (bias.double().view(1, -1, 1, 1) if with_bias else 0)
    tile_of_pixel = torch.arange(pixels).view(n, conv.shape[2], conv.shape[3]) // TILE
    return y, ref_y, (partial_mean, partial_m2, partial_count, mean, var), tile_of_pixel, tiles


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training(lib, shape, with_bias, dtype):
    y, ref_y, stats, tile_of_pixel, tiles = _training(lib, shape, dtype, with_bias)
    assert rel(y, ref_y) < tol(dtype)
    check_training(y, *stats, tile_of_pixel, tiles, dtype)


def test_training_statistics_large_mean_offset(lib):
    """|mean| / std ~ 1e3 in float32: the per-tile two-pass M2 and Chan's merge keep the
    variance of the stored conv_out (a sum / sum-of-squares variance would not)."""
    y, ref_y, stats, tile_of_pixel, tiles = _training(lib, (3, 8, 9, 9, 6, 1), torch.float32, True, offset=1000.0)
    assert rel(y, ref_y) < 1e-6
    _, _, _, mean, var = stats
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    assert rel(mean, ref_mean) < 1e-6
    assert rel(var, ref_var) < 1e-4


@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["centred", "offset1e3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tile_stats_merge(lib, dtype, offset):
    """The merge alone: more partials than threads (each thread merges several, in order),
    fewer blocks than channels (grid-stride), tiles of unequal counts."""
    channels, tiles, blocks, threads = 5, 100, 2, 32
    counts = torch.randint(1, 65, (tiles,), dtype=torch.int32)
    samples = torch.randn(channels, int(counts.sum()), dtype=torch.float64) * 0.5 + offset
    pieces = samples.split(counts.tolist(), dim=1)
    partial_mean = torch.stack([p.mean(dim=1) for p in pieces], dim=1).to(dtype).contiguous()
    partial_m2 = torch.stack([((p - p.mean(dim=1, keepdim=True)) ** 2).sum(dim=1) for p in pieces], dim=1)
    partial_m2 = partial_m2.to(dtype).contiguous()
    mean = torch.full((channels,), float("nan"), dtype=dtype)
    var = torch.full((channels,), float("nan"), dtype=dtype)
    run(lib, "tile_stats_merge", dtype, partial_mean, partial_m2, counts, tiles, channels, blocks, threads, mean, var)
    ref_var, ref_mean = torch.var_mean(samples, dim=1, unbiased=False)
    assert rel(mean, ref_mean) < tol(dtype)
    assert rel(var, ref_var) < (1e-4 if dtype == torch.float32 else 1e-10)
