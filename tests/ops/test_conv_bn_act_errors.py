"""Bad input to conv_bn_act gets a clear error naming the argument; nothing runs."""
import pytest
import torch

from cnnkernels import ops


def good(**overrides):
    args = dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(16, 8, 3, 3), bn_weight=torch.ones(16),
                bn_bias=torch.zeros(16), running_mean=torch.zeros(16), running_var=torch.ones(16), padding=1)
    args.update(overrides)
    return args


def call(**overrides):
    args = good(**overrides)
    return ops.conv_bn_act(args.pop("x"), args.pop("weight"), **args)


def test_good_arguments_run():
    assert call().shape == (2, 16, 6, 6)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
    (dict(weight=torch.randn(16, 8, 3)), ValueError, "weight must be 4-D"),
    (dict(x=torch.randint(0, 5, (2, 8, 6, 6))), TypeError, "x must be a floating tensor"),
    (dict(weight=torch.randn(16, 8, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (dict(weight=torch.randn(16, 4, 3, 3)), ValueError, "x has 8 channels but weight expects 4"),
    (dict(weight=torch.randn(16, 3, 3, 3), groups=3), ValueError, "groups=3 must divide"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(bn_weight=torch.ones(15)), ValueError, "bn_weight must have 16 elements"),
    (dict(running_var=torch.ones(17)), ValueError, "running_var must have 16 elements"),
    (dict(bn_bias=torch.zeros(16, dtype=torch.float64)), TypeError, "bn_bias must be float32"),
    (dict(bias=torch.zeros(15)), ValueError, "bias must have 16 elements"),
    (dict(activation="gelu"), ValueError, "activation must be one of 'relu', 'none'"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (dict(dilation=-1), ValueError, "dilation must be >= 1"),
    (dict(running_mean=None), ValueError, "running_mean and running_var must be given together"),
    (dict(running_mean=None, running_var=None), ValueError, "required when training=False"),
    (dict(padding=0, x=torch.randn(2, 8, 2, 2)), ValueError, "does not fit"),
    (dict(residual=torch.randn(2, 16, 5, 5)), ValueError, "residual must have the output's shape"),
    (dict(residual=torch.randn(2, 16, 6, 6, dtype=torch.float64)), TypeError, "residual has dtype"),
    (dict(x=torch.randn(1, 8, 1, 1), weight=torch.randn(16, 8, 1, 1), padding=0, training=True),
     ValueError, "more than 1 value per channel"),
])
def test_bad_argument_is_named(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device (CUDA)")
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="weight is on cuda"):
        call(weight=torch.randn(16, 8, 3, 3, device="cuda"))


def test_device_mismatch_with_meta_tensor_is_named():
    with pytest.raises(ValueError, match="bn_weight is on meta"):
        call(bn_weight=torch.ones(16, device="meta"))
