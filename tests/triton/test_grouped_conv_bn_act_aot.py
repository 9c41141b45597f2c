"""Ahead-of-time compile of the grouped conv_bn_act kernel for sm_80 and sm_90, with no
GPU: every configuration grouped_conv_bn_act.config() can return (each groups-per-tile
packing x each precision), in training and eval, must compile, spill no registers and
fit the SM's shared memory (machinery in tests/triton/aot.py). The launches are
recorded from the real launcher on small CPU tensors; the layers are chosen so that
they reach every configuration, which the test checks against the rule evaluated over
every channels-per-group count the dispatch accepts."""
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

# (groups, channels per group, stride): ResNeXt-32x4d's four stages, scaled down in groups.
LAYERS = [(8, 4, 1), (4, 8, 2), (2, 16, 1), (2, 32, 2)]
_CONFIG_KEYS = ("BLOCK_M", "GROUPS_PER_TILE", "SLOT", "PRECISION", "num_warps", "num_stages")


def _reachable_configs() -> set:
    per_group = range(1, 65)
    found = set()
    for cin_g in per_group:
        for cout_g in per_group:
            for groups in (2, 4, 8, 32):
                weight_shape = (groups * cout_g, cin_g, 3, 3)
                if grouped_conv_bn_act.mismatch(weight_shape, (1, 1), (1, 1), (1, 1), groups) is None:
                    found |= {config_key(grouped_conv_bn_act.config(dtype, cin_g, cout_g, precision), _CONFIG_KEYS)
                              for dtype, precision in DTYPES}
    return found


def _launches() -> list:
    layers = [(groups * per_group, groups * per_group, 3, stride, groups) for groups, per_group, stride in LAYERS]
    return launches(layers, "grouped", "_grouped_conv_fwd_kernel")


def test_layers_reach_every_configuration():
    assert_launches_reach(_launches(), _reachable_configs(), _CONFIG_KEYS)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: the grouped kernel spills registers (255 per thread) in most "
                   "tile configurations on sm_80/sm_90 (2026-11-23); remove this mark once it compiles clean")
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_configuration_compiles_without_spills(capability):
    assert_each_config_compiles(_launches(), _reachable_configs(), capability)
