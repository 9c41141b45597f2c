"""The grouped conv_bn_act kernel (cnnkernels/triton/grouped_conv_bn_act.py) through the
public op with the Triton backend forced, run by Triton's interpreter on CPU tensors,
against the float64 reference: output, running statistics and every gradient, train
and eval (tests/triton/op_check.py; NaN-poisoned buffers; the grouped kernel must be the
one that ran). The cases cover every packing (4, 8, 16, 32 channels per group: 8, 4, 2, 2
groups per tile), a group count that is not a multiple of the groups per tile, channels
per group that are not powers of two, several row tiles, and both the vector tiles
(aligned channels-last tensors) and the scalar ones (anything else)."""
from __future__ import annotations

import pytest
import torch

from cnnkernels.triton import grouped_conv_bn_act
from helpers import ConvCase
from op_check import check_triton_against_reference

CASES = [
    # 12 groups of 4: a full tile of 8 groups and a half-empty one.
    ConvCase("g12x4_s1_channels_last_residual_relu", c_in=48, c_out=48, hw=6, groups=12, channels_last=True,
             residual=True),
    ConvCase("g4x6_s2_nchw_bias_none", c_in=24, c_out=24, hw=7, stride=2, groups=4, bias=True, activation="none"),
    ConvCase("g4x8_s1_nchw_residual_none", c_in=32, c_out=32, hw=5, groups=4, residual=True, activation="none"),
    ConvCase("g2x32_s2_channels_last_relu", c_in=64, c_out=64, hw=6, stride=2, groups=2, channels_last=True),
    ConvCase("g3x16_s1_many_rows", n=3, c_in=48, c_out=48, hw=6, groups=3, bias=True, residual=True),
    ConvCase("g8x4_s2_channels_last_vector", c_in=32, c_out=32, hw=7, stride=2, groups=8, channels_last=True,
             bias=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32(monkeypatch, case, training):
    check_triton_against_reference(monkeypatch, case, torch.float32, training, "grouped")


BF16_CASES = [
    ConvCase("bf16_g8x8_s2_channels_last_residual", c_in=64, c_out=64, hw=9, stride=2, groups=8,
             channels_last=True, residual=True, bias=True),
    ConvCase("bf16_g8x4_s1_nchw_none", c_in=32, c_out=32, hw=6, groups=8, activation="none"),
    ConvCase("bf16_g4x16_s1_channels_last_vector", c_in=64, c_out=64, hw=12, groups=4, channels_last=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16(monkeypatch, case, training):
    check_triton_against_reference(monkeypatch, case, torch.bfloat16, training, "grouped")


@pytest.mark.parametrize("case", [
    ConvCase("depthwise", c_in=16, c_out=16, hw=5, groups=16),
    ConvCase("g2x4_too_few_groups", c_in=8, c_out=8, hw=5, groups=2),
    ConvCase("g4x8_dilated", c_in=32, c_out=32, hw=6, groups=4, padding=2, dilation=2),
    ConvCase("g4x8to12", c_in=32, c_out=48, hw=5, groups=4, residual=True),
], ids=lambda c: c.name)
def test_outside_the_rule_runs_the_general_kernel(monkeypatch, case):
    check_triton_against_reference(monkeypatch, case, torch.float32, True, "general")


@pytest.mark.parametrize("per_group, groups_per_tile, width", [(4, 8, 32), (3, 8, 32), (5, 4, 32), (8, 4, 32),
                                                               (12, 2, 32), (16, 2, 32), (17, 2, 64), (32, 2, 64)])
@pytest.mark.parametrize("vector", [True, False])
def test_packing_rule(per_group, groups_per_tile, width, vector):
    cfg = grouped_conv_bn_act.config(torch.bfloat16, per_group, "ieee", vector)
    assert cfg["GROUPS_PER_TILE"] == groups_per_tile
    assert cfg["BLOCK_K"] == cfg["BLOCK_N"] == width >= groups_per_tile * per_group


def test_packed_weight_is_block_diagonal():
    groups, per_group = 6, 4  # one full tile of 4 groups (per_tile forced) and one half-empty
    weight = torch.randn(groups * per_group, per_group, 3, 3)
    packed = grouped_conv_bn_act.pack_weight(weight, groups, 4, 32, 32)
    assert packed.shape == (2, 9, 32, 32) and packed.is_contiguous()
    expected = torch.zeros(2, 9, 32, 32)
    for g in range(groups):
        tile, j = divmod(g, 4)
        block = weight[g * per_group:(g + 1) * per_group].reshape(per_group, per_group, 9)  # [co, ci, tap]
        expected[tile, :, j * per_group:(j + 1) * per_group, j * per_group:(j + 1) * per_group] = \
            block.permute(2, 1, 0)
    assert torch.equal(packed, expected)


def test_mismatch_reasons():
    def why(c_out, cin_g, k, groups, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
        return grouped_conv_bn_act.mismatch((c_out, cin_g, k, k), stride, padding, dilation, groups)

    assert why(128, 4, 3, 32) is None and why(1024, 32, 3, 32, stride=(2, 2)) is None
    assert "groups=1" in why(64, 64, 3, 1)
    assert "channels per group" in why(64, 2, 3, 32) and "channels per group" in why(2048, 64, 3, 32)
    assert "differ" in why(48, 8, 3, 4)
    assert "not 3x3" in why(128, 4, 1, 32)
    assert "padding" in why(128, 4, 3, 32, padding=(0, 0)) and "stride" in why(128, 4, 3, 32, stride=(3, 3))
    assert "fewer than the 8 groups" in why(16, 4, 3, 4)
