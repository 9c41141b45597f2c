"""The native helper _max_pool2d_channels_last_native and frozen_cpu.max_pool (the frozen
inference path's max pooling without indices): equal to torch's max_pool2d on random
inputs for every pooling geometry the models use and more, NaN and -inf windows, and
the conditions under which it is taken."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnkernels  # noqa: F401  (loads cnnkernels._C when it is built)
from cnnkernels import _library
from cnnkernels.nn import frozen_cpu
from helpers import skip_or_fail

OP = "_max_pool2d_channels_last_native"


@pytest.fixture(autouse=True)
def _require_kernel():
    if not _library.has_native_kernel(OP, "CPU"):
        skip_or_fail(f"cnnkernels._C with the CPU kernel {OP} is not loaded")


def pool(x, k, s, p, d=1, ceil=False):
    pair = nn.modules.utils._pair
    return torch.ops.cnnkernels._max_pool2d_channels_last_native(x, pair(k), pair(s), pair(p), pair(d), ceil)


GEOMETRIES = [  # kernel, stride, padding, dilation, ceil_mode, H, W
    (3, 2, 1, 1, False, 17, 16),  # ResNet / DenseNet stem
    (2, 2, 0, 1, False, 9, 8),  # VGG
    (3, 2, 0, 1, True, 15, 14),  # GoogLeNet / Inception, ceil_mode
    (3, 1, 1, 1, True, 7, 7),  # Inception branch pool
    ((3, 2), (1, 2), (1, 0), (2, 1), False, 11, 9),
    (4, 3, 2, 1, True, 10, 13),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_equals_torch(dtype, geometry):
    k, s, p, d, ceil, h, w = geometry
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 21, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    got = pool(x, k, s, p, d, ceil)
    want = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)  # max only selects: bit for bit


def test_nan_propagates_and_padding_never_wins():
    x = -torch.ones(1, 3, 4, 4) * 5
    x[0, 1, 0, 0] = float("nan")
    x[0, 2] = float("-inf")
    x = x.contiguous(memory_format=torch.channels_last)
    got = pool(x, 3, 2, 1)
    assert torch.isnan(got[0, 1, 0, 0]) and not torch.isnan(got[0, 1, 1, 1])
    assert (got[0, 0] == -5).all()  # all-negative windows with padding: the padding (-inf) never wins
    assert (got[0, 2] == float("-inf")).all()
    assert torch.equal(got.nan_to_num(), F.max_pool2d(x, 3, 2, 1).nan_to_num())


@pytest.mark.parametrize("overrides, match", [
    (dict(x=torch.randn(2, 3, 8)), "x must be a 4-D tensor"),
    (dict(x=torch.randn(2, 3, 8, 8)), "x must be channels_last-contiguous"),
    (dict(x=torch.randint(0, 5, (2, 3, 8, 8)).contiguous(memory_format=torch.channels_last)),
     "x must be a floating-point tensor"),
    (dict(k=0), "kernel_size values must be >= 1"),
    (dict(s=0), "stride values must be >= 1"),
    (dict(p=2), "padding must be at most half the kernel size"),
    (dict(d=0), "dilation values must be >= 1"),
    (dict(x=torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last), p=0),
     "smaller than the dilated kernel"),
])
def test_bad_arguments_are_named(overrides, match):
    args = dict(x=torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), k=3, s=2, p=1, d=1)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        pool(args["x"], args["k"], args["s"], args["p"], args["d"])


def test_frozen_max_pool_conditions():
    module = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    assert torch.equal(frozen_cpu.max_pool(module, x), module(x))
    assert frozen_cpu.max_pool(module, x.contiguous()) is None  # NCHW: torch's own
    assert frozen_cpu.max_pool(nn.MaxPool2d(3, 2, 1, return_indices=True), x) is None
    assert frozen_cpu.max_pool(nn.AvgPool2d(2), x) is None
    leaf = x.clone().requires_grad_()
    assert frozen_cpu.max_pool(module, leaf) is None
    with torch.no_grad():
        assert torch.equal(frozen_cpu.max_pool(module, leaf), module(x))
    handle = module.register_forward_hook(lambda *args: None)
    assert frozen_cpu.max_pool(module, x) is None
    handle.remove()
    assert frozen_cpu.max_pool(nn.MaxPool2d(2), x).shape == (2, 4, 4, 4)  # stride None: the kernel size
