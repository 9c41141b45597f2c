"""Bad input to conv_bn_act gets a clear error naming the argument; nothing runs."""
import pytest
import torch

from cnnkernels import ops
from helpers import CONV_ARGUMENT_ERRORS, call_conv_op


def call(**overrides):
    return call_conv_op(ops.conv_bn_act, 16, **overrides)


def test_good_arguments_run():
    assert call().shape == (2, 16, 6, 6)


@pytest.mark.parametrize("overrides, error, match", CONV_ARGUMENT_ERRORS + [
    (dict(bn_weight=torch.ones(15)), ValueError, "bn_weight must have 16 elements"),
    (dict(running_var=torch.ones(17)), ValueError, "running_var must have 16 elements"),
    (dict(bn_bias=torch.zeros(16, dtype=torch.float64)), TypeError, "bn_bias must be float32"),
    (dict(residual=torch.randn(2, 16, 5, 5)), ValueError, "residual must have the output's shape"),
    (dict(residual=torch.randn(2, 16, 6, 6, dtype=torch.float64)), TypeError, "residual has dtype"),
])
def test_bad_argument_is_named(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


@pytest.mark.gpu  # a device mismatch needs a second device (CUDA)
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="weight is on cuda"):
        call(weight=torch.randn(16, 8, 3, 3, device="cuda"))


def test_device_mismatch_with_meta_tensor_is_named():
    with pytest.raises(ValueError, match="bn_weight is on meta"):
        call(bn_weight=torch.ones(16, device="meta"))
