"""Shared by the AOT tests of conv_bn_act's specialised forward kernels
(test_conv1x1_bn_act_aot.py, test_grouped_conv_bn_act_aot.py): run small layers through
the real Triton launcher for each dtype and dot precision, record the launches of one
kernel, and check that each configuration compiles (machinery in aot.py)."""
from __future__ import annotations

import torch
from aot import assert_fits, compile_launches, record_launches, unique_launches

from cnnkernels.triton import conv1x1_bn_act, grouped_conv_bn_act
from cnnkernels.triton import conv_bn_act as module

# float16 is left out: it compiles to the same tiles and resources as bfloat16.
DTYPES = ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))


def run_forward(c_in: int, c_out: int, k: int, stride: int, groups: int, channels_last: bool, dtype: torch.dtype,
                kernel: str) -> None:
    """conv_bn_act's Triton forward, training and eval, on a [2, c_in, 5, 5] x, a k x k
    weight ("same" padding) and a residual, all channels-last or all NCHW; asserts that
    it picks `kernel`, with vector access exactly for channels-last tensors (the layers
    of the tests have channel counts that are multiples of 16 there)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c_in, 5, 5, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(c_out, c_in // groups, k, k, dtype=dtype)
    vec = torch.rand(c_out) + 0.5
    h_out = (5 + 2 * (k // 2) - k) // stride + 1
    residual = torch.randn(2, c_out, h_out, h_out, dtype=dtype).contiguous(memory_format=fmt)
    conv = ([stride] * 2, [k // 2] * 2, [1, 1], groups)
    assert module._forward_kernel(w.shape, *conv)[0] == kernel
    assert module._vector_io(x, w, residual, c_out, kernel) == channels_last
    for training in (True, False):
        module.forward(x, w, vec.to(dtype), vec, vec, vec, vec, *conv, training, 1e-5, residual, "relu")


def launches(layers: list, kind: str, kernel_name: str) -> list:
    """The launches of the Triton kernel kernel_name while run_forward runs each layer
    (c_in, c_out, k, stride, groups, channels_last) of `layers` (picking `kind`), for each (dtype, dot
    precision) of DTYPES with that precision forced."""
    found = []
    saved_precision = module._dot_precision
    for dtype, precision in DTYPES:
        module._dot_precision = lambda device: precision
        try:
            found += record_launches((module, conv1x1_bn_act, grouped_conv_bn_act),
                                     lambda: [run_forward(*layer, dtype, kind) for layer in layers])
        finally:
            module._dot_precision = saved_precision
    return [launch for launch in found if launch[0].__name__ == kernel_name]


def config_key(cfg: dict, keys: tuple[str, ...]) -> tuple:
    return tuple(cfg[k] for k in keys)


def assert_launches_reach(launched: list, configs: set, keys: tuple[str, ...]) -> None:
    """The launched configurations (their `keys`) are exactly `configs`."""
    assert {config_key(kwargs, keys) for _, _, kwargs in launched} == configs


def assert_each_config_compiles(launched: list, configs: set, capability: int) -> None:
    """Every configuration compiles, in training and eval, without spills and within the SM's limits."""
    report = compile_launches(launched, capability)
    # training and eval epilogue of each configuration (each compiled in every alignment the layers reach)
    assert len({key[:-1] for key in unique_launches(launched, capability)}) == 2 * len(configs)
    assert_fits(report, capability)
