"""Ahead-of-time compile of conv_bn_act's specialised forward kernels, the 1x1 GEMM
(conv1x1_bn_act.py) and the grouped one (grouped_conv_bn_act.py), for sm_80 and sm_90,
with no GPU: every tile configuration their config() can return, in training and eval,
must compile, spill no registers and fit the SM's shared memory (machinery in
tests/triton/aot.py and conv_aot.py).

The launches are recorded from the real launcher on small CPU tensors; the layers of
each kernel are chosen so that they reach every configuration, which the test checks
against the rule evaluated over a wide range of channel counts:
  conv1x1: the vector table on aligned channels-last tensors (C_out <= 64 and > 64), the
      scalar table on NCHW ones with odd channel counts (its worst case);
  grouped: every configuration (tile width 32 or 64 x vector or scalar access x
      precision) over every channels-per-group count the dispatch accepts, each width
      with aligned channels-last tensors and NCHW ones. The groups per tile (8, 4, 2)
      are a runtime argument: one compile serves every packing of a width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("triton")
from aot import assert_fits, compile_launches, each_capability, skip_if_interpreting, unique_launches  # noqa: E402
from conv_aot import DTYPES, SHARED_MODULES, layer, record_each_precision  # noqa: E402

from cnnkernels.triton import conv1x1_bn_act, grouped_conv_bn_act  # noqa: E402
from cnnkernels.triton import conv_bn_act as module  # noqa: E402

pytestmark = skip_if_interpreting


@dataclass(frozen=True)
class Specialised:
    """One specialised forward kernel: the name _forward_kernel gives it, its Triton
    kernel, the layers (c_in, c_out, k, stride, groups, channels_last) that reach all its
    configurations, the configurations reachable at all, and the keys that tell them apart."""
    kind: str
    kernel: str
    layers: list
    reachable: Callable[[], set]
    keys: tuple[str, ...]

    def launches(self) -> list:
        """The launches of the kernel while run_forward runs each layer, for each (dtype,
        dot precision) of DTYPES with that precision forced."""
        found = record_each_precision(module, (module, conv1x1_bn_act, grouped_conv_bn_act, *SHARED_MODULES),
                                      lambda dtype: [run_forward(*layer, dtype, self.kind) for layer in self.layers])
        return [launch for launch in found if launch[0].__name__ == self.kernel]

    def key(self, cfg: dict) -> tuple:
        return tuple(cfg[k] for k in self.keys)


def run_forward(c_in: int, c_out: int, k: int, stride: int, groups: int, channels_last: bool, dtype: torch.dtype,
                kind: str) -> None:
    """conv_bn_act's Triton forward, training and eval, on a [2, c_in, 5, 5] x, a k x k
    weight ("same" padding) and a residual, all channels-last or all NCHW; asserts that
    it picks `kind`, with vector access exactly for channels-last tensors (the layers
    of the tests have channel counts that are multiples of 16 there)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, w, vec, residual, conv = layer(c_in, c_out, k, stride, groups, dtype, fmt, 5)
    assert module._forward_kernel(w.shape, *conv)[0] == kind
    assert module._vector_io(x, w, residual, c_out, kind) == channels_last
    for training in (True, False):
        module.forward(x, w, vec.to(dtype), vec, vec, vec, vec, *conv, training, 1e-5, residual, "relu")


_CONV1X1_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PRECISION", "num_warps", "num_stages")
_CHANNELS = sorted(set(range(1, 129)) | {2 ** p for p in range(8, 13)} | {3 * 2 ** p for p in range(6, 11)})


def _conv1x1_reachable() -> set:
    return {tuple(conv1x1_bn_act.config(dtype, c_in, c_out, precision, vector)[k] for k in _CONV1X1_KEYS)
            for dtype, precision in DTYPES for c_in in _CHANNELS for c_out in _CHANNELS for vector in (True, False)}


_GROUPED_KEYS = ("BLOCK_M", "BLOCK_K", "BLOCK_N", "PRECISION", "num_warps", "num_stages")


def _grouped_reachable() -> set:
    found = set()
    for per_group in range(1, 65):
        for groups in (2, 4, 8, 32):
            weight_shape = (groups * per_group, per_group, 3, 3)
            if grouped_conv_bn_act.mismatch(weight_shape, (1, 1), (1, 1), (1, 1), groups) is None:
                found |= {tuple(grouped_conv_bn_act.config(dtype, per_group, precision, vector)[k]
                                for k in _GROUPED_KEYS)
                          for dtype, precision in DTYPES for vector in (True, False)}
    return found


KERNELS = [
    # (c_in, c_out, stride, channels_last): channels-last with channel counts that are
    # multiples of 16 reach the vector table (C_out <= 64 and > 64); NCHW with odd
    # channel counts the scalar one, in its worst case (every access a scalar one).
    Specialised("conv1x1", "_conv1x1_fwd_kernel",
                [(c_in, c_out, 1, stride, 1, cl) for c_in, c_out, stride, cl in
                 [(64, 64, 1, True), (64, 256, 2, True), (40, 72, 2, False)]],
                _conv1x1_reachable, _CONV1X1_KEYS),
    # (groups, channels per group, stride, channels_last): tile widths 32 and 64, each with
    # aligned channels-last tensors (vector table) and NCHW ones (scalar table, its worst case).
    Specialised("grouped", "_grouped_conv_fwd_kernel",
                [(groups * per_group, groups * per_group, 3, stride, groups, cl) for groups, per_group, stride, cl in
                 [(8, 4, 1, True), (2, 32, 2, True), (8, 4, 2, False), (2, 32, 1, False)]],
                _grouped_reachable, _GROUPED_KEYS),
]
each_kernel = pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.kind)


@each_kernel
def test_layers_reach_every_configuration(kernel):
    assert {kernel.key(kwargs) for _, _, kwargs in kernel.launches()} == kernel.reachable()


@pytest.mark.slow
@each_kernel
@each_capability
def test_every_configuration_compiles_without_spills(kernel, capability):
    """Every configuration compiles, in training and eval, without spills and within the SM's limits."""
    launched = kernel.launches()
    report = compile_launches(launched, capability)
    # training and eval epilogue of each configuration (each compiled in every alignment the layers reach)
    assert len({key[:-1] for key in unique_launches(launched, capability)}) == 2 * len(kernel.reachable())
    assert_fits(report, capability)
