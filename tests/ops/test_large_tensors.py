"""Tensors too large for 32-bit indexing, checked without allocating them (meta tensors,
FakeTensorMode, stride-0 expanded CPU tensors):

- every op's fake implementation takes shapes of more than 2^31 elements and gives the
  output and gradient shapes (the Python argument checks have no size limit);
- the Triton backends run such tensors where their kernels' 32-bit arithmetic holds (the
  sample offset n * stride_n is int64; add_act is int64 throughout) and otherwise turn
  them away before launch, with a reason naming the tensor and the limit
  (cnnkernels/triton/_support.index_reasons); forced, that is a BackendError;
- the CUDA backend's specialised conv_bn_act kernels (32-bit offsets) leave x, output or
  weight of more than 2^30 elements to cuDNN (cnnkernels/ops/_conv_bn_act_choice.py, the
  mirror of csrc/common/conv_bn_act_kernel_choice.h; tests/cuda_emulation/
  test_conv_bn_act_choice.py checks that the two agree, large weights included);
- the C++ CPU kernels index in int64 and turn nothing away by size.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cnnkernels
from cnnkernels import _backends, _library, ops
from cnnkernels.ops._registration import PUBLIC_CALLS
from cnnkernels.ops import _conv_bn_act_choice as choice
from cnnkernels.triton import _support as triton_support  # importable without triton (its checks say so)
from cnnkernels.triton import add_act as triton_add_act
from cnnkernels.triton import bn_act_conv as triton_bn_act_conv
from cnnkernels.triton import conv_bn_act as triton_conv_bn_act
from cnnkernels.triton import se_excite as triton_se_excite
from helpers import skip_or_fail

needs_triton = pytest.mark.skipif(triton_support.triton is None, reason="triton is not installed")

BIG = (2, 64, 8192, 4096)  # 2^32 elements, 2^31 per sample, 2^26 pixels: within every int32 limit
SPAN = "elements within one sample, more than the 2^31"
ROWS = "rows (N*H*W pixels) exceed"


def meta(*shape, strides=None, dtype=torch.float32):
    """A meta tensor (no storage) of that shape, dense or with those strides."""
    if strides is None:
        return torch.empty(shape, device="meta", dtype=dtype)
    return torch.empty_strided(shape, strides, device="meta", dtype=dtype)


def channels_last(*shape, dtype=torch.float32):
    n, c, h, w = shape
    return meta(*shape, strides=(c * h * w, 1, w * c, c), dtype=dtype)


def conv_call(x, weight, *, training=False, residual=None, out=None, op="conv_bn_act", **kwargs):
    """Schema arguments of ops.<op> (conv_bn_act, bn_act_conv, bn_act_conv_into) on x and weight,
    BN parameters of the right size on x's device."""
    c = weight.shape[0] if op == "conv_bn_act" else x.shape[1]
    bn = [torch.ones(c, device=x.device) for _ in range(4)]
    if op == "conv_bn_act":
        kwargs["residual"] = residual
    if out is not None:
        kwargs["out"] = out
    return PUBLIC_CALLS[op].normalize(x, weight, None, *bn, training=training, **kwargs)


def se_call(x, residual=None):
    c, r = x.shape[1], 16
    dev = x.device
    return PUBLIC_CALLS["se_excite"].normalize(x, torch.ones(r, c, device=dev), torch.ones(r, device=dev),
                                               torch.ones(c, r, device=dev), torch.ones(c, device=dev),
                                               residual=residual, activation="relu")


# --- fake implementations: shapes of more than 2^31 elements ------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [BIG, (1, 64, 8192, 8192)], ids=["2^32", "2^32-per-sample"])
def test_fake_conv_ops_give_the_shapes(shape, training):
    with FakeTensorMode():
        x = torch.empty(shape, requires_grad=True)
        for op, c_in, c_out in (("conv_bn_act", shape[1], 32), ("bn_act_conv", shape[1], 32)):
            weight = torch.empty(c_out, c_in, 3, 3, requires_grad=True)
            c = c_out if op == "conv_bn_act" else c_in
            out = getattr(ops, op)(x, weight, None, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c),
                                   padding=1, stride=2, training=training)
            assert out.shape == (shape[0], c_out, shape[2] // 2, shape[3] // 2), op
            grad_x, grad_w = torch.autograd.grad(out, [x, weight], torch.ones_like(out))
            assert grad_x.shape == x.shape and grad_w.shape == weight.shape, op


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # out='s alias check
def test_fake_bn_act_conv_into_a_channel_slice():
    with FakeTensorMode():
        buf = torch.empty(2, 96, 8192, 4096)
        x = buf[:, :64]
        out = ops.bn_act_conv(x, torch.empty(32, 64, 3, 3), None, *[torch.ones(64)] * 4, padding=1,
                              out=torch.empty(2, 128, 8192, 4096)[:, 96:])
        assert out.shape == (2, 32, 8192, 4096)


@pytest.mark.parametrize("shape", [(3, 2 ** 31), BIG], ids=["2-D", "4-D"])
def test_fake_add_act_gives_the_shapes(shape):
    with FakeTensorMode():
        x = torch.empty(shape, requires_grad=True)
        out = ops.add_act(x, torch.empty(shape))
        assert out.shape == shape
        assert torch.autograd.grad(out, x, torch.ones_like(out))[0].shape == shape


def test_fake_se_excite_gives_the_shapes():
    with FakeTensorMode():
        x = torch.empty(BIG, requires_grad=True)
        w1 = torch.empty(16, BIG[1], requires_grad=True)
        out = ops.se_excite(x, w1, torch.empty(16), torch.empty(BIG[1], 16), torch.empty(BIG[1]),
                            residual=torch.empty(BIG), activation="relu")
        assert out.shape == BIG
        grad_x, grad_w1 = torch.autograd.grad(out, [x, w1], torch.ones_like(out))
        assert grad_x.shape == BIG and grad_w1.shape == w1.shape


# --- Triton: which tensors the int32 kernels run, which they turn away ------------------

def test_index_reasons_limits():
    limit = triton_support.INT32_MAX + 1  # 2^31 elements: offsets 0 .. 2^31 - 1
    assert triton_support.index_reasons(0, dict(x=(1, limit))) == []
    assert "x of shape (1, 2147483649) spans 2147483649" in triton_support.index_reasons(0, dict(x=(1, limit + 1)))[0]
    assert triton_support.index_reasons(triton_support.MAX_ROWS, {}) == []
    assert ROWS in triton_support.index_reasons(triton_support.MAX_ROWS + 1, {})[0]
    # the span follows the strides: a channel prefix of a wide channels-last buffer spans the buffer's pixels
    wide = channels_last(1, 2 ** 14, 512, 512)
    assert triton_support.sample_span(wide[:, :64]) == 1 + 63 + 511 * 512 * 2 ** 14 + 511 * 2 ** 14
    assert triton_support.sample_span(meta(2, 8, 4, 4)[:, :, ::2]) == 1 + 7 * 16 + 1 * 8 + 3
    assert triton_support.sample_span(meta(2, 1, 1, 1).expand(2, 8, 4, 4)) == 128  # never below a dense copy's


def _index_reasons(reasons):
    return [r for r in reasons if "int32" in r]


W3 = meta(32, 64, 3, 3)
CONV_CASES = [  # (name, schema arguments of conv_bn_act's forward, expected substring or None)
    ("2^32 elements, 2^31 per sample", lambda: conv_call(meta(*BIG), W3, padding=1), None),
    ("channels_last 2^32", lambda: conv_call(channels_last(*BIG), W3, padding=1, training=True), None),
    ("2^32 per sample", lambda: conv_call(meta(1, 64, 8192, 8192), W3, padding=1), "x of shape (1, 64, 8192, 8192)"),
    ("2^32 pixels", lambda: conv_call(meta(2 ** 16, 1, 256, 256), meta(8, 1, 1, 1)), ROWS),
    ("big output", lambda: conv_call(meta(1, 1, 2 ** 15, 2 ** 15), meta(4, 1, 1, 1)), "out of shape (1, 4, 32768"),
    ("residual view", lambda: conv_call(meta(2, 8, 1024, 1024), meta(8, 8, 1, 1),
                                        residual=channels_last(2, 4096, 1024, 1024)[:, :8]),
     "residual of shape (2, 8, 1024, 1024)"),
    ("strided 1x1 weight", lambda: conv_call(meta(1, 4096, 8, 8), meta(8, 4096, 1, 1, strides=(1, 2 ** 20, 1, 1))),
     "weight of shape (8, 4096, 1, 1)"),
]


@needs_triton
@pytest.mark.parametrize("name, make, expected", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_triton_conv_bn_act_forward(name, make, expected):
    reasons = _index_reasons(triton_conv_bn_act.unsupported_reasons(*make()))
    if expected is None:
        assert reasons == []
    else:
        assert any(expected in r and (SPAN in r or ROWS in r) for r in reasons), reasons


def _conv_bn_act_backward_args(grad_out, out, conv_out):
    x, weight = meta(2, 8, 1024, 1024), meta(16, 8, 1, 1)
    s = torch.ones(16, device="meta")
    return (grad_out, out, x, weight, None, conv_out, s, s, s, [1, 1], [0, 0], [1, 1], 1, True, 1e-5, "relu",
            [True] * 6)


@needs_triton
def test_triton_conv_bn_act_backward_checks_its_own_tensors():
    def index_reasons(grad_out, out, conv_out):
        args = _conv_bn_act_backward_args(grad_out, out, conv_out)
        return _index_reasons(_backends.reasons_for("conv_bn_act_backward", "triton", args))

    dense = meta(2, 16, 1024, 1024)
    assert index_reasons(dense, dense, dense) == []
    wide = channels_last(2, 2 ** 12, 1024, 1024)[:, :16]  # grad_out a channel slice of a wide buffer
    reasons = index_reasons(wide, dense, dense)
    assert len(reasons) == 1 and reasons[0].startswith("grad_out of shape (2, 16, 1024, 1024) spans"), reasons


@needs_triton
def test_triton_bn_act_conv_forward_into_and_backward():
    wide_x = channels_last(1, 2 ** 14, 512, 512)[:, :64]  # 2^24 elements, but spanning 2^32 per sample
    for x, expected in ((meta(*BIG), None), (channels_last(*BIG), None), (wide_x, "x of shape (1, 64, 512, 512)"),
                        (meta(2 ** 15, 8, 256, 256), ROWS)):
        args = conv_call(x, meta(32, x.shape[1], 3, 3), op="bn_act_conv", padding=1, training=True)
        reasons = _index_reasons(triton_bn_act_conv.unsupported_reasons(*args))
        assert (reasons == []) if expected is None else any(expected in r for r in reasons), (x.shape, reasons)
        # the backward runs the forward's checks on x (z, grad_z and grad_x are dense copies of its shape)
        c = x.shape[1]
        s = torch.ones(c, device="meta")
        grad_out = meta(x.shape[0], 32, x.shape[2], x.shape[3])
        reasons = _index_reasons(_backends.reasons_for("bn_act_conv_backward", "triton", (
            grad_out, x, args[1], None, s, s, s, s, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, "relu", [True] * 5)))
        assert (reasons == []) if expected is None else any(expected in r for r in reasons), (x.shape, reasons)
    # into: out written through its strides
    x = meta(1, 64, 512, 512)
    for out, expected in ((channels_last(1, 256, 512, 512)[:, 64:96], None),
                          (channels_last(1, 2 ** 14, 512, 512)[:, 64:96], "out of shape (1, 32, 512, 512)")):
        args = conv_call(x, meta(32, 64, 3, 3), op="bn_act_conv_into", padding=1, out=out)
        reasons = _index_reasons(_backends.reasons_for("bn_act_conv_into", "triton", args))
        assert (reasons == []) if expected is None else any(expected in r and SPAN in r for r in reasons), reasons


@needs_triton
def test_triton_se_excite_forward_and_backward():
    assert _index_reasons(triton_se_excite.unsupported_reasons(*se_call(meta(*BIG), meta(*BIG)))) == []
    reasons = _index_reasons(triton_se_excite.unsupported_reasons(*se_call(meta(1, 64, 8192, 8192))))
    assert any(r.startswith("x of shape (1, 64, 8192, 8192)") for r in reasons), reasons
    assert any(r.startswith("out of shape") for r in reasons), reasons
    reasons = _index_reasons(triton_se_excite.unsupported_reasons(
        *se_call(meta(2, 64, 4096, 4096), residual=channels_last(2, 2 ** 8, 4096, 4096)[:, :64])))
    assert len(reasons) == 1 and reasons[0].startswith("residual of shape"), reasons
    assert ROWS in _index_reasons(triton_se_excite.unsupported_reasons(*se_call(meta(2 ** 15, 4, 256, 256))))[0]

    x = meta(2, 64, 1024, 1024)
    wide = channels_last(2, 2 ** 12, 1024, 1024)[:, :64]
    s = torch.ones(2, 64, device="meta")
    for grad_out, out, expected in ((x, x, None), (wide, x, "grad_out of shape"), (x, wide, "out of shape")):
        reasons = _index_reasons(_backends.reasons_for("se_excite_backward", "triton", (
            grad_out, out, x, meta(16, 64), meta(64, 16), s, meta(2, 16), s, "relu", [True] * 6)))
        assert (reasons == []) if expected is None else (len(reasons) == 1 and reasons[0].startswith(expected))


@needs_triton
def test_triton_add_act_indexes_in_int64_up_to_the_grid_limit():
    block, limit = triton_add_act.BLOCK, triton_support.INT32_MAX
    for numel, ok in ((2 ** 31 + 1, True), (2 ** 34, True), (limit * block, True), (limit * block + 1, False)):
        x = meta(numel)
        reasons = [r for r in triton_add_act.unsupported_reasons(x, x, "relu") if "meta" not in r]
        assert (reasons == []) == ok, (numel, reasons)
        if not ok:
            assert reasons == [f"{numel} elements need more than the {limit} programs of one grid axis "
                               f"({block} elements each)"]


@needs_triton
@pytest.mark.parametrize("op, make", [
    ("conv_bn_act", lambda: conv_call(meta(1, 64, 8192, 8192), W3, padding=1)),
    ("bn_act_conv", lambda: conv_call(meta(1, 64, 8192, 8192), W3, op="bn_act_conv", padding=1)),
    ("se_excite", lambda: se_call(meta(1, 64, 8192, 8192))),
])
def test_forced_triton_raises_a_clear_error_before_launch(op, make):
    args = make()
    with cnnkernels.use_backend("triton"):
        with pytest.raises(_backends.BackendError, match=r"x of shape \(1, 64, 8192, 8192\) spans 4294967296 "
                                                         r"elements within one sample, more than the 2\^31"):
            _backends.select(op, args)
    assert any("int32" in r for r in _backends.explain(op, args)["rejected"]["triton"])


# --- CUDA: the specialised conv_bn_act kernels (32-bit offsets) leave big tensors to cuDNN --

def _cuda_choice(n, c_in, h, w, c_out, k, groups, dtype="float64"):
    pad = k // 2
    return choice.cuda_kernel(n, c_in, h, w, c_out, k, k, (1, 1), (pad, pad), (1, 1), groups, dtype, True, False)


@pytest.mark.parametrize("shape, expected", [
    ((8, 64, 56, 56, 256, 1, 1), (choice.CONV1X1_GEMM, "1x1 convolution")),
    ((2 ** 12, 64, 64, 64, 64, 1, 1), (choice.CONV1X1_GEMM, "1x1 convolution")),  # x and output of 2^30
    ((2 ** 12 + 1, 64, 64, 64, 64, 1, 1), (choice.CUDNN_EPILOGUE, "more than 2^30 elements")),
    ((1, 2 ** 15, 1, 1, 2 ** 15, 1, 1), (choice.CONV1X1_GEMM, "1x1 convolution")),  # weight of exactly 2^30
    ((1, 2 ** 15, 1, 1, 2 ** 15 + 1, 1, 1), (choice.CUDNN_EPILOGUE, "a weight of more than 2^30 elements")),
    ((1, 2 ** 16, 1, 1, 2 ** 16, 1, 1), (choice.CUDNN_EPILOGUE, "a weight of more than 2^30 elements")),
    ((1, 2 ** 22, 1, 1, 2 ** 22, 3, 2 ** 17), (choice.CUDNN_EPILOGUE, "a weight of more than 2^30 elements")),
    ((1, 2 ** 20, 1, 1, 2 ** 20, 3, 2 ** 15), (choice.GROUPED_CONV3X3, "grouped 3x3 convolution")),
])
def test_cuda_specialised_kernels_leave_big_tensors_to_cudnn(shape, expected):
    n, c_in, h, w, c_out, k, groups = shape
    assert _cuda_choice(n, c_in, h, w, c_out, k, groups) == expected


def test_cuda_describe_on_meta_tensors_names_the_fallback():
    dtype = torch.float64
    args = conv_call(channels_last(1, 2 ** 16, 2, 2, dtype=dtype), meta(2 ** 16, 2 ** 16, 1, 1, dtype=dtype))
    text = choice.describe_cuda(*args)
    assert text.startswith(choice.CUDNN_EPILOGUE) and "a weight of more than 2^30 elements" in text, text


# --- CPU: the C++ kernels index in int64; nothing is turned away by size -------------------

def _expanded(*shape):
    """A CPU tensor of that shape that holds one element (stride 0 everywhere)."""
    return torch.zeros(()).expand(shape)


@pytest.mark.parametrize("op, make", [
    ("conv_bn_act", lambda: conv_call(_expanded(*BIG), torch.zeros(32, 64, 3, 3), padding=1, training=True)),
    ("bn_act_conv", lambda: conv_call(_expanded(*BIG), torch.zeros(32, 64, 3, 3), op="bn_act_conv", padding=1)),
    ("add_act", lambda: (_expanded(3, 2 ** 31), _expanded(3, 2 ** 31), "relu")),
    ("se_excite", lambda: se_call(_expanded(1, 64, 8192, 8192))),
])
def test_cpu_backend_takes_big_tensors(op, make):
    if not _library.extension_loaded():
        skip_or_fail(f"cnnkernels._C is not loaded ({_library.LOAD_ERROR})")
    args = make()
    assert _backends.reasons_for(op, "cpu", args) == []
    assert _backends.reasons_for(op, "reference", args) == []
