"""The native helper _dense_block_frozen_native (a frozen DenseNet block's layers in one
call): its argument checks. Its results against the per-layer replay, bit for bit, are in
tests/nn/test_frozen_cpu_densenet.py."""
import pytest
import torch

import cnnkernels  # noqa: F401  (loads cnnkernels._C when it is built)
from cnnkernels import _library
from cnnkernels.nn import frozen_cpu
from helpers import skip_or_fail

OP = "_dense_block_frozen_native"


@pytest.fixture(autouse=True)
def _require_kernel():
    if not _library.has_native_kernel(OP, "CPU") or not frozen_cpu._support()[0]:
        skip_or_fail(f"cnnkernels._C with the CPU kernel {OP} (and torch with oneDNN) is not loaded")


def good(layers=2, c0=4, k=3, width=5):
    """Arguments of a block of `layers` layers on a [2, c0 + layers * k, 6, 5] buffer."""
    gen = torch.Generator().manual_seed(0)
    n, h, w = 2, 6, 5
    buf = torch.randn(n, c0 + layers * k, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    args = dict(buf=buf, c0=c0, scratch=torch.empty(n * buf.shape[1] * h * w), scale=[], shift=[], weight1=[],
                bias1=[], weight2=[], bias2=[], conv1_args=[0, 0, 1, 1, 1, 1, 1], conv2_args=[1, 1, 1, 1, 1, 1, 1])
    c = c0
    for _ in range(layers):
        args["scale"].append(torch.rand(c, generator=gen) + 0.5)
        args["shift"].append(torch.randn(c, generator=gen))
        args["weight1"].append(torch.randn(width, c, 1, 1, generator=gen).contiguous(memory_format=torch.channels_last))
        args["bias1"].append(torch.randn(width, generator=gen))
        args["weight2"].append(torch.randn(k, width, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last))
        args["bias2"].append(None)
        c += k
    return args


def run(**overrides):
    args = dict(good(), **overrides)
    return torch.ops.cnnkernels._dense_block_frozen_native(*args.values())


def test_good_arguments_grow_the_buffer_as_the_layers_do():
    args = good()
    buf = args["buf"]
    first = buf[:, :4].clone()
    want = buf.clone()
    c = 4
    for i in range(2):
        z = torch.relu(want[:, :c] * args["scale"][i].view(1, -1, 1, 1) + args["shift"][i].view(1, -1, 1, 1))
        b = torch.relu(torch.nn.functional.conv2d(z, args["weight1"][i], args["bias1"][i]))
        want[:, c:c + 3] = torch.nn.functional.conv2d(b, args["weight2"][i], None, padding=1)
        c += 3
    assert torch.ops.cnnkernels._dense_block_frozen_native(*args.values()) is None
    assert torch.equal(buf[:, :4], first)
    torch.testing.assert_close(buf, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(buf=torch.randn(2, 10, 6, 5)), "buf must be channels_last-contiguous"),
    (dict(buf=torch.randn(10, 6, 5)), "buf must be a 4-D tensor"),
    (dict(c0=0), r"c0 must be in \[1, 10\]"),
    (dict(c0=11), r"c0 must be in \[1, 10\]"),
    (dict(shift=[torch.zeros(4)]), "one entry per layer"),
    (dict(bias2=[None]), "one entry per layer"),
    (dict(conv1_args=[0, 0, 1, 1, 1, 1]), r"conv1_args must hold \[pad_h"),
    (dict(conv2_args=[1, 1, 1, 1, 1, 1, 1, 1]), r"conv2_args must hold \[pad_h"),
    (dict(scratch=torch.empty(2 * 4 * 6 * 5 - 1)), "scratch holds 239 elements, layer 0 needs 240"),
    (dict(scratch=torch.empty(2 * 10 * 6 * 5, dtype=torch.float64)), "scratch must be a contiguous 1-D tensor"),
    (dict(scratch=torch.empty(2, 10 * 6 * 5)), "scratch must be a contiguous 1-D tensor"),
])
def test_bad_arguments_are_named(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        run(**overrides)


def test_layers_that_outgrow_the_buffer_are_refused_before_any_write():
    args = good(layers=3)
    args["buf"] = args["buf"][:, :10].contiguous(memory_format=torch.channels_last)
    before = args["buf"].clone()
    with pytest.raises(RuntimeError, match="layer 2 adds 3 channels to 10: more than buf's 10"):
        torch.ops.cnnkernels._dense_block_frozen_native(*args.values())
    assert torch.equal(args["buf"], before)
