"""The grouped conv_bn_act kernel (cnnkernels/triton/grouped_conv_bn_act.py) through the
public op with the Triton backend forced, run by Triton's interpreter on CPU tensors,
against the float64 reference: output, running statistics and every gradient, train
and eval (tests/triton/op_check.py; NaN-poisoned buffers; the grouped kernel must be the
one that ran). The cases cover every packing (4, 8, 16, 32 channels per group: 8, 4, 2, 2
groups per tile), a group count that is not a multiple of the groups per tile, channels
per group that are not powers of two, C_in/groups != C_out/groups, several row tiles."""
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
    ConvCase("g4x8to12_s1_nchw_residual_none", c_in=32, c_out=48, hw=5, groups=4, residual=True,
             activation="none"),
    ConvCase("g2x32_s2_channels_last_relu", c_in=64, c_out=64, hw=6, stride=2, groups=2, channels_last=True),
    ConvCase("g3x16_s1_many_rows", n=3, c_in=48, c_out=48, hw=6, groups=3, bias=True, residual=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32(monkeypatch, case, training):
    check_triton_against_reference(monkeypatch, case, torch.float32, training, "grouped")


BF16_CASES = [
    ConvCase("bf16_g8x8_s2_channels_last_residual", c_in=64, c_out=64, hw=9, stride=2, groups=8,
             channels_last=True, residual=True, bias=True),
    ConvCase("bf16_g8x4_s1_nchw_none", c_in=32, c_out=32, hw=6, groups=8, activation="none"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16(monkeypatch, case, training):
    check_triton_against_reference(monkeypatch, case, torch.bfloat16, training, "grouped")


@pytest.mark.parametrize("case", [
    ConvCase("depthwise", c_in=16, c_out=16, hw=5, groups=16),
    ConvCase("g2x4_too_few_groups", c_in=8, c_out=8, hw=5, groups=2),
    ConvCase("g4x8_dilated", c_in=32, c_out=32, hw=6, groups=4, padding=2, dilation=2),
], ids=lambda c: c.name)
def test_outside_the_rule_runs_the_general_kernel(monkeypatch, case):
    check_triton_against_reference(monkeypatch, case, torch.float32, True, "general")


@pytest.mark.parametrize("per_group, groups_per_tile", [(4, 8), (3, 8), (5, 4), (8, 4), (12, 2), (16, 2), (32, 2)])
def test_packing_rule(per_group, groups_per_tile):
    cfg = grouped_conv_bn_act.config(torch.bfloat16, per_group, per_group, "ieee")
    assert cfg["GROUPS_PER_TILE"] == groups_per_tile
    assert cfg["SLOT"] >= per_group and cfg["SLOT"] * groups_per_tile in (32, 64)


def test_mismatch_reasons():
    def why(c_out, cin_g, k, groups, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
        return grouped_conv_bn_act.mismatch((c_out, cin_g, k, k), stride, padding, dilation, groups)

    assert why(128, 4, 3, 32) is None and why(1024, 32, 3, 32, stride=(2, 2)) is None
    assert "groups=1" in why(64, 64, 3, 1)
    assert "channels per group" in why(64, 2, 3, 32) and "channels per group" in why(2048, 64, 3, 32)
    assert "not 3x3" in why(128, 4, 1, 32)
    assert "padding" in why(128, 4, 3, 32, padding=(0, 0)) and "stride" in why(128, 4, 3, 32, stride=(3, 3))
    assert "fewer than the 8 groups" in why(16, 4, 3, 4)
