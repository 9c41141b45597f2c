"""The 1x1 conv_bn_act kernel (cnnkernels/triton/conv1x1_bn_act.py) through the public op
with the Triton backend forced, run by Triton's interpreter on CPU tensors, against the
float64 reference: output, running statistics and every gradient, train and eval
(tests/triton/op_check.py; NaN-poisoned buffers; the 1x1 kernel must be the one that
ran). Channel counts are not multiples of the tiles, and there are several row, column
and reduction tiles; both the vector tiles (aligned channels-last tensors: on CPU,
float32 64x64x32 and bfloat16 128x{64,128}x64) and the scalar ones (anything else:
64x64x16 and 64x64x32) run."""
from __future__ import annotations

import pytest
import torch

from helpers import ConvCase
from op_check import check_triton_against_reference

CASES = [
    ConvCase("s1_channels_last_residual_relu", c_in=40, c_out=70, hw=6, kernel=1, padding=0,
             channels_last=True, residual=True),
    ConvCase("s2_nchw_bias_none", c_in=20, c_out=24, hw=7, kernel=1, padding=0, stride=2, bias=True,
             activation="none"),
    ConvCase("s2_channels_last_residual_none", c_in=12, c_out=40, hw=5, kernel=1, padding=0, stride=2,
             channels_last=True, residual=True, activation="none"),
    ConvCase("s1_nchw_relu", n=3, c_in=33, c_out=17, hw=5, kernel=1, padding=0),
    # 10 row tiles x 2 column tiles: the programs walk the row tiles in bands of 8.
    ConvCase("many_row_tiles", n=2, c_in=8, c_out=70, hw=17, kernel=1, padding=0, bias=True, residual=True),
    ConvCase("s2_channels_last_vector", c_in=80, c_out=48, hw=7, kernel=1, padding=0, stride=2,
             channels_last=True, bias=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32(monkeypatch, case, training):
    check_triton_against_reference(monkeypatch, case, torch.float32, training, "conv1x1")


BF16_CASES = [
    ConvCase("bf16_s2_channels_last_residual", c_in=70, c_out=136, hw=9, kernel=1, padding=0, stride=2,
             channels_last=True, residual=True, bias=True),
    ConvCase("bf16_s1_nchw_none", c_in=24, c_out=40, hw=12, kernel=1, padding=0, activation="none"),
    ConvCase("bf16_s1_channels_last_vector", c_in=80, c_out=144, hw=12, kernel=1, padding=0, channels_last=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16(monkeypatch, case, training):
    check_triton_against_reference(monkeypatch, case, torch.bfloat16, training, "conv1x1")


def test_dilation_is_moot_and_padding_is_not(monkeypatch):
    """A dilated 1x1 is still a 1x1 GEMM; a padded one is not."""
    check_triton_against_reference(monkeypatch, ConvCase("dilated", c_in=8, c_out=8, hw=5, kernel=1, padding=0,
                                                         dilation=2), torch.float32, True, "conv1x1")
    check_triton_against_reference(monkeypatch, ConvCase("padded", c_in=8, c_out=8, hw=5, kernel=1, padding=1),
                                   torch.float32, True, "general")
