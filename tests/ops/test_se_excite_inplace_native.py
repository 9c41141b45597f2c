"""The native helper _se_excite_inplace_native (the frozen SE blocks' gate, written into x):
equal to the se_excite op's own kernel, against plain torch in float64, with and without
residual and ReLU, in both memory formats; its argument errors."""
import pytest
import torch

import cnnkernels  # noqa: F401  (loads cnnkernels._C when it is built)
from cnnkernels import _library
from cnnkernels.nn.squeeze_excite import squeeze_excite
from helpers import rel_err, skip_or_fail

OP = "_se_excite_inplace_native"


@pytest.fixture(autouse=True)
def _require_kernel():
    if not _library.has_native_kernel(OP, "CPU"):
        skip_or_fail(f"cnnkernels._C with the CPU kernel {OP} is not loaded")


def args(dtype=torch.float32, channels_last=True, residual=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 24, 5, 7, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    res = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last) if residual else None
    return dict(x=x, fc1_weight=torch.randn(8, 24, generator=gen) * 0.3, fc1_bias=torch.randn(8, generator=gen),
                fc2_weight=torch.randn(24, 8, generator=gen) * 0.3, fc2_bias=torch.randn(24, generator=gen),
                residual=res)


def run(a, activation):
    x = a["x"].clone(memory_format=torch.preserve_format)
    assert getattr(torch.ops.cnnkernels, OP)(x, a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"],
                                              a["residual"], activation) is None
    return x


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_matches_the_op_kernel_and_float64(channels_last, residual, activation):
    a = args(channels_last=channels_last, residual=residual)
    got = run(a, activation)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = torch.ops.cnnkernels._se_excite_forward_native(*a.values(), activation)[0]
    assert torch.equal(got, want)
    exact = squeeze_excite(*(None if t is None else t.double() for t in a.values()), activation=activation)
    assert rel_err(got.double(), exact) < 1e-6
    if activation == "relu":
        assert (got >= 0).all()


def test_bfloat16_x_with_float32_gate_weights():
    a = args(dtype=torch.bfloat16)
    got = run(a, "relu")
    assert got.dtype == torch.bfloat16
    exact = squeeze_excite(*(None if t is None else t.double() for t in a.values()), activation="relu")
    assert rel_err(got.double(), exact) < 1e-2


def test_residual_may_be_x_itself():
    a = args(residual=False)
    a["residual"] = a["x"]
    want = squeeze_excite(*(None if t is None else t.double() for t in a.values()), activation="relu")
    x = a["x"].clone(memory_format=torch.channels_last)
    getattr(torch.ops.cnnkernels, OP)(x, a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"], x, "relu")
    assert rel_err(x.double(), want) < 1e-6


@pytest.mark.parametrize("overrides, match", [
    (dict(fc1_weight=torch.randn(8, 23)), r"fc1_weight must have shape \[8, 24\]"),
    (dict(fc2_weight=torch.randn(24, 8, 1, 1)), r"fc2_weight must have shape \[24, 8\]"),
    (dict(fc1_bias=torch.randn(7)), r"fc1_bias must have shape \[8\]"),
    (dict(fc2_bias=torch.randint(0, 2, (24,))), "fc2_bias must be a floating-point tensor"),
    (dict(x=torch.randn(3, 24, 7, 5).transpose(2, 3)), "x must be NCHW- or channels_last-contiguous"),
    (dict(residual=torch.randn(3, 24, 5, 6)), "residual must have the shape of x"),
    (dict(residual=torch.randn(3, 24, 5, 7, dtype=torch.float64)), "residual must have the dtype of x"),
])
def test_bad_arguments_are_named(overrides, match):
    a = args()
    a.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.cnnkernels, OP)(a["x"], a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"],
                                          a["residual"], "relu")


def test_a_residual_partly_overlapping_x_is_refused():
    base = torch.randn(3 * 24 * 5 * 7 + 24)
    x = base[:3 * 24 * 5 * 7].view(3, 5, 7, 24).permute(0, 3, 1, 2)
    residual = base[24:].view(3, 5, 7, 24).permute(0, 3, 1, 2)
    a = args()
    with pytest.raises(RuntimeError, match="residual must not partly overlap x"):
        getattr(torch.ops.cnnkernels, OP)(x, a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"],
                                          residual, "relu")
