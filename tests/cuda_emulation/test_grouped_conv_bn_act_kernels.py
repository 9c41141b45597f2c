"""The grouped 3x3 convolution of conv_bn_act (csrc/cuda/grouped_conv_bn_act_kernels.cuh)
and the tile-statistics merge (conv_bn_act_tile_epilogue.cuh), run on the CPU through
the host emulation and checked against torch in float64: the eval epilogue (folded BN
scale / shift, residual, ReLU) and the training outputs (conv_out, per-tile partial
statistics, merged batch statistics). Every buffer the kernels write starts as NaN
(counts as -1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import emulation_build
from tile_stats_reference import (DTYPE_IDS, DTYPES, I64, INT, P, check_training, eval_cases, eval_reference,
                                  nan_like, rel, run, tol, training_buffers)

HARNESS = "grouped_conv_bn_act_harness.cpp"
SIGNATURES = {"grouped_conv_bn_act": [P, P, I64, I64, I64, I64, I64, I64, INT, INT, P, P, P, INT, P,
                                      P, P, P, P, P, P, P]}
TILE = 8  # output pixels per tile side

# (n, groups, cin_g, cout_g, h, w, stride)
SHAPES = [
    (2, 32, 4, 4, 5, 6, 1),    # ResNeXt 32x4d: 16 groups per block, 2 slabs, 2 channel chunks
    (1, 4, 6, 6, 9, 10, 2),    # 6 channels per group: a thread's channels straddle groups
    (2, 3, 32, 32, 9, 9, 1),   # 32 per group: 2 groups per block, the last slab half empty, 4 chunks
    (1, 2, 5, 7, 17, 3, 2),    # 5 in / 7 out per group, 9 output rows: two tile rows
    (1, 8, 8, 12, 4, 4, 1),    # 12 out per group: 5 groups per block (60 channels), slabs of 5 and 3
]
SHAPE_IDS = ["32x4", "g6_s2", "32per_group", "in5_out7_s2", "out12"]


@pytest.fixture(scope="module")
def lib():
    handle = emulation_build.load(HARNESS, SIGNATURES)
    for suffix in ("f32", "f64"):
        plan = getattr(handle, f"grouped_conv_plan_{suffix}")
        plan.argtypes, plan.restype = [I64] * 6 + [INT, P], None
    return handle


def _plan(lib, shape, dtype):
    n, groups, cin_g, cout_g, h, w, stride = shape
    plan = torch.zeros(3, dtype=torch.int64)
    getattr(lib, "grouped_conv_plan_" + ("f32" if dtype == torch.float32 else "f64"))(
        n, groups * cin_g, h, w, groups * cout_g, groups, stride, plan.data_ptr())
    return plan.tolist()


def _inputs(shape, dtype, with_residual):
    n, groups, cin_g, cout_g, h, w, stride = shape
    x = torch.randn(n, groups * cin_g, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(groups * cout_g, cin_g, 3, 3, dtype=dtype) * (9 * cin_g) ** -0.5
    conv = F.conv2d(x.double(), weight.double(), stride=stride, padding=1, groups=groups)
    residual = torch.randn(conv.shape, dtype=dtype).contiguous(memory_format=torch.channels_last) \
        if with_residual else None
    return x, weight.permute(0, 2, 3, 1).contiguous(), conv, residual  # weight as [C_out, 3, 3, cin_g]


def test_plan_covers_slabs_and_chunks(lib):
    """The shapes above reach several group slabs per image and several channel chunks."""
    for dtype in DTYPES:
        plans = {name: _plan(lib, shape, dtype) for name, shape in zip(SHAPE_IDS, SHAPES)}
        for name, shape in zip(SHAPE_IDS, SHAPES):
            groups_per_block, chunk, tiles = plans[name]
            n, groups, cin_g, cout_g, h, w, stride = shape
            assert 1 <= groups_per_block * cout_g <= 64 and 1 <= chunk <= cin_g
            assert tiles == n * -(-((h - 1) // stride + 1) // TILE) * -(-((w - 1) // stride + 1) // TILE)
        assert any(groups % gb and gb < groups for (gb, _, _), (_, groups, *_) in zip(plans.values(), SHAPES))
        assert any(chunk < cin_g for (_, chunk, _), (_, _, cin_g, *_) in zip(plans.values(), SHAPES))


@pytest.mark.parametrize("shape,with_residual,relu,dtype", eval_cases(SHAPES, SHAPE_IDS))
def test_eval(lib, shape, with_residual, relu, dtype):
    n, groups, cin_g, cout_g, h, w, stride = shape
    x, weight, conv, residual = _inputs(shape, dtype, with_residual)
    c_out = groups * cout_g
    scale, shift = torch.randn(c_out, dtype=dtype), torch.randn(c_out, dtype=dtype)
    out = nan_like(conv.to(dtype).contiguous(memory_format=torch.channels_last))
    run(lib, "grouped_conv_bn_act", dtype, x, weight, n, groups * cin_g, h, w, c_out, groups, stride, 0,
        scale, shift, residual, int(relu), out, None, None, None, None, None, None, None)
    assert rel(out, eval_reference(conv, scale, shift, residual, relu)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training(lib, shape, with_bias, dtype):
    n, groups, cin_g, cout_g, h, w, stride = shape
    x, weight, conv, _ = _inputs(shape, dtype, False)
    c_out = groups * cout_g
    bias = torch.randn(c_out, dtype=dtype) if with_bias else None
    tiles = _plan(lib, shape, dtype)[2]
    y = nan_like(conv.to(dtype).contiguous(memory_format=torch.channels_last))
    partial_mean, partial_m2, partial_count, mean, var = training_buffers(c_out, tiles, dtype)
    run(lib, "grouped_conv_bn_act", dtype, x, weight, n, groups * cin_g, h, w, c_out, groups, stride, 1,
        None, None, None, 0, None, bias, y, partial_mean, partial_m2, partial_count, mean, var)
    ref_y = conv + (bias.double().view(1, -1, 1, 1) if with_bias else 0)
    assert rel(y, ref_y) < tol(dtype)
    h_out, w_out = conv.shape[2:]
    tiles_h, tiles_w = -(-h_out // TILE), -(-w_out // TILE)
    tile_of_pixel = ((torch.arange(n).view(-1, 1, 1) * tiles_h + torch.arange(h_out).view(1, -1, 1) // TILE) * tiles_w
                     + torch.arange(w_out).view(1, 1, -1) // TILE)
    check_training(y, partial_mean, partial_m2, partial_count, mean, var, tile_of_pixel, tiles, dtype)
