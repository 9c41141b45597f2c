"""Ahead-of-time compile of the grouped conv_bn_act kernel for sm_80 and sm_90, with no
GPU: every configuration grouped_conv_bn_act.config() can return (tile width 32 or 64 x
vector or scalar access x precision), in training and eval, must compile, spill no
registers and fit the SM's shared memory (machinery in tests/triton/aot.py). The
launches are recorded from the real launcher on small CPU tensors; the layers are
chosen so that they reach every configuration, which the test checks against the rule
evaluated over every channels-per-group count the dispatch accepts. The groups per tile
(8, 4, 2) are a runtime argument: one compile serves every packing of a width."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from aot import CAPABILITIES  # noqa: E402
from conv_aot import (DTYPES, assert_each_config_compiles, assert_launches_reach, config_key,  # noqa: E402
                      launches)

from cnnkernels.triton import grouped_conv_bn_act  # noqa: E402

# (groups, channels per group, stride, channels_last): tile widths 32 and 64, each with
# aligned channels-last tensors (vector table) and NCHW ones (scalar table, its worst case).
LAYERS = [(8, 4, 1, True), (2, 32, 2, True), (8, 4, 2, False), (2, 32, 1, False)]
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_K", "BLOCK_N", "PRECISION", "num_warps", "num_stages")


def _reachable_configs() -> set:
    found = set()
    for per_group in range(1, 65):
        for groups in (2, 4, 8, 32):
            weight_shape = (groups * per_group, per_group, 3, 3)
            if grouped_conv_bn_act.mismatch(weight_shape, (1, 1), (1, 1), (1, 1), groups) is None:
                found |= {config_key(grouped_conv_bn_act.config(dtype, per_group, precision, vector), _CONFIG_KEYS)
                          for dtype, precision in DTYPES for vector in (True, False)}
    return found


def _launches() -> list:
    layers = [(groups * per_group, groups * per_group, 3, stride, groups, channels_last)
              for groups, per_group, stride, channels_last in LAYERS]
    return launches(layers, "grouped", "_grouped_conv_fwd_kernel")


def test_layers_reach_every_configuration():
    assert_launches_reach(_launches(), _reachable_configs(), _CONFIG_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_configuration_compiles_without_spills(capability):
    assert_each_config_compiles(_launches(), _reachable_configs(), capability)
