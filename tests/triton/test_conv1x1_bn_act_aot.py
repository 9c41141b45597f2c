"""Ahead-of-time compile of the 1x1 conv_bn_act kernel for sm_80 and sm_90, with no GPU:
every tile configuration conv1x1_bn_act.config() can return, in training and eval, must
compile, spill no registers and fit the SM's shared memory (machinery in
tests/triton/aot.py). The launches are recorded from the real launcher on small CPU
tensors; the layers are chosen so that they reach every configuration, which the test
checks against the rule evaluated over a wide range of channel counts: the vector table
on aligned channels-last tensors, the scalar table on NCHW ones with odd channel
counts (its worst case)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from aot import CAPABILITIES  # noqa: E402
from conv_aot import (DTYPES, assert_each_config_compiles, assert_launches_reach, config_key,  # noqa: E402
                      launches)

from cnnkernels.triton import conv1x1_bn_act  # noqa: E402

# (c_in, c_out, stride, channels_last): channels-last with channel counts that are
# multiples of 16 reach the vector table (C_out <= 64 and > 64); NCHW with odd channel
# counts the scalar one, in its worst case (every access a scalar one).
LAYERS = [(64, 64, 1, True), (64, 256, 2, True), (40, 72, 2, False)]
CHANNELS = sorted(set(range(1, 129)) | {2 ** p for p in range(8, 13)} | {3 * 2 ** p for p in range(6, 11)})
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PRECISION", "num_warps", "num_stages")


def _reachable_configs() -> set:
    return {config_key(conv1x1_bn_act.config(dtype, c_in, c_out, precision, vector), _CONFIG_KEYS)
            for dtype, precision in DTYPES for c_in in CHANNELS for c_out in CHANNELS for vector in (True, False)}


def _launches() -> list:
    layers = [(c_in, c_out, 1, stride, 1, channels_last) for c_in, c_out, stride, channels_last in LAYERS]
    return launches(layers, "conv1x1", "_conv1x1_fwd_kernel")


def test_layers_reach_every_configuration():
    assert_launches_reach(_launches(), _reachable_configs(), _CONFIG_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_configuration_compiles_without_spills(capability):
    assert_each_config_compiles(_launches(), _reachable_configs(), capability)
