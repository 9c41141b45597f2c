"""Shared by the AOT tests of the Triton convolution kernels (test_conv_bn_act_aot.py,
test_bn_act_conv_aot.py, test_conv_bn_act_specialised_aot.py): the dtypes and dot
precisions they compile for, the kernels conv_bn_act and bn_act_conv share, recording
an op's launches for each precision, and the small layers they run (machinery in
aot.py)."""
from __future__ import annotations

import torch
from aot import assert_kernels_compile, kernels_of, record_launches

from cnnkernels.triton import _bn, _implicit_gemm

# float16 is left out: it compiles to the same tiles and resources as bfloat16.
DTYPES = ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))
# (c_in, c_out, kernel, stride, groups) of the direct (C_in/groups <= 4) layers, whose
# tiles both ops' tables share (_conv_tiles._common): stem with 64 columns, 16 columns,
# depthwise.
DIRECT_LAYERS = [(3, 64, 7, 2, 1), (3, 16, 3, 1, 1), (32, 32, 3, 1, 32)]
# The kernels conv_bn_act and bn_act_conv both launch.
SHARED_MODULES = (_bn, _implicit_gemm)
SHARED_KERNELS = [name for shared in SHARED_MODULES for name in kernels_of(shared)]


def record_each_precision(op_module, modules, body) -> list:
    """The launches of the kernels of `modules` while body(dtype) runs, for each (dtype,
    dot precision) of DTYPES with op_module's dot precision forced to that one."""
    found = []
    saved_precision = op_module._dot_precision
    for dtype, precision in DTYPES:
        op_module._dot_precision = lambda device: precision
        try:
            found += record_launches(modules, lambda: body(dtype))
        finally:
            op_module._dot_precision = saved_precision
    return found


def assert_op_compiles(op_module, body, capability: int, other_modules=()) -> None:
    """Every launch of the op's launchers while body(dtype) runs, for each (dtype, dot
    precision) of DTYPES, compiles for sm_<capability> without spills and within its
    shared memory, and together they reach every kernel of the op and the shared ones
    (other_modules: more kernel modules to record, so that none of theirs runs)."""
    launches = record_each_precision(op_module, (op_module, *other_modules, *SHARED_MODULES), body)
    assert_kernels_compile(launches, kernels_of(op_module) + SHARED_KERNELS, capability)


def layer(c_in: int, c_out: int, k: int, stride: int, groups: int, dtype: torch.dtype, layout: torch.memory_format,
          size: int):
    """(x [2, c_in, size, size], weight (k x k), a positive [C_out] vector for the bias and
    BN arguments, residual, (stride, padding, dilation, groups)) of a "same"-padded layer,
    x and residual in `layout`."""
    x = torch.randn(2, c_in, size, size, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(c_out, c_in // groups, k, k, dtype=dtype)
    vec = torch.rand(c_out) + 0.5
    h_out = (size + 2 * (k // 2) - k) // stride + 1
    residual = torch.randn(2, c_out, h_out, h_out, dtype=dtype).contiguous(memory_format=layout)
    return x, w, vec, residual, ([stride] * 2, [k // 2] * 2, [1, 1], groups)
