"""Bad input to bn_act_conv gets a clear error naming the argument; nothing runs.
The C++ driver's own checks (reached by calling the _native ops directly) are tested too."""
import pytest
import torch

from cnnkernels import _library, ops
from helpers import CONV_ARGUMENT_ERRORS, call_conv_op


def call(**overrides):
    return call_conv_op(ops.bn_act_conv, 8, **overrides)


def test_good_arguments_run():
    assert call().shape == (2, 16, 6, 6)
    out = torch.empty(2, 16, 6, 6)
    assert call(out=out) is out


@pytest.mark.parametrize("overrides, error, match", CONV_ARGUMENT_ERRORS + [
    (dict(bn_weight=torch.ones(16)), ValueError, r"bn_weight must have 8 elements \(one per channel of x\)"),
    (dict(running_var=torch.ones(17)), ValueError, "running_var must have 8 elements"),
    (dict(running_mean=torch.zeros(8, 1)), ValueError, "running_mean must be 1-D"),
    (dict(bn_bias=torch.zeros(8, dtype=torch.float64)), TypeError, "bn_bias must be float32"),
    (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    (dict(out=torch.empty(2, 16, 5, 5)), ValueError, "out must have the output's shape"),
    (dict(out=torch.empty(2, 16, 6, 6, dtype=torch.float64)), TypeError, "out has dtype torch.float64"),
    (dict(out=torch.empty(2, 16, 6, 6, device="meta")), ValueError, "out is on meta"),
    (dict(out=torch.empty(16, 6, 6)), ValueError, "out must be 4-D"),
    (dict(out=torch.empty(2, 16, 6, 6), weight=torch.randn(16, 8, 3, 3, requires_grad=True)),
     RuntimeError, r"does not record autograd.*torch.no_grad\(\)"),
])
def test_bad_argument_is_named(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def test_out_aliasing_x_is_rejected():
    buf = torch.randn(2, 16, 6, 6)
    with pytest.raises(ValueError, match="out must not overlap x"):
        ops.bn_act_conv(buf[:, :8], torch.randn(8, 8, 1, 1), running_mean=torch.zeros(8),
                        running_var=torch.ones(8), out=buf[:, :8])


def test_out_under_no_grad_accepts_inputs_that_require_grad():
    weight = torch.randn(16, 8, 3, 3, requires_grad=True)
    with torch.no_grad():
        assert call(out=torch.empty(2, 16, 6, 6), weight=weight).shape == (2, 16, 6, 6)


@pytest.mark.gpu  # a device mismatch needs a second device (CUDA)
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="weight is on cuda"):
        call(weight=torch.randn(16, 8, 3, 3, device="cuda"))


def test_device_mismatch_with_meta_tensor_is_named():
    with pytest.raises(ValueError, match="bn_weight is on meta"):
        call(bn_weight=torch.ones(8, device="meta"))


# --- the C++ driver's checks -------------------------------------------------------------

native = pytest.mark.skipif(
    not (_library.extension_loaded() and hasattr(torch.ops.cnnkernels, "_bn_act_conv_forward_native")
         and _library.has_native_kernel("_bn_act_conv_forward_native", "CPU")),
    reason="cnnkernels._C with the CPU kernels of bn_act_conv is not built here")


def native_args(**overrides):
    args = dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(16, 8, 3, 3), bias=None, bn_weight=torch.ones(8),
                bn_bias=torch.zeros(8), running_mean=torch.zeros(8), running_var=torch.ones(8), stride=[1, 1],
                padding=[1, 1], dilation=[1, 1], groups=1, training=False, eps=1e-5, activation="relu")
    args.update(overrides)
    return list(args.values())


@native
@pytest.mark.parametrize("overrides, match", [
    (dict(bn_weight=torch.ones(16)), "bn_weight must have C_in = 8 elements"),
    (dict(running_var=torch.ones(3)), "running_var must have C_in = 8 elements"),
    (dict(running_mean=None, running_var=None), "required when training=False"),
    (dict(weight=torch.randn(16, 4, 3, 3)), "weight must have C_in / groups = 8"),
    (dict(activation="tanh"), "activation must be"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(x=torch.randn(2, 8, 1, 1), padding=[0, 0]), "smaller than the dilated kernel"),
])
def test_native_forward_names_the_argument(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.cnnkernels._bn_act_conv_forward_native(*native_args(**overrides))


@native
def test_native_into_checks_out():
    args = native_args()
    with pytest.raises(RuntimeError, match="out must have the shape of the output"):
        torch.ops.cnnkernels._bn_act_conv_into_native(torch.empty(2, 16, 5, 6), *args)
    with pytest.raises(RuntimeError, match="out must have the dtype of x"):
        torch.ops.cnnkernels._bn_act_conv_into_native(torch.empty(2, 16, 6, 6, dtype=torch.float64), *args)
    with pytest.raises(RuntimeError, match="internally overlapping"):
        torch.ops.cnnkernels._bn_act_conv_into_native(torch.empty(1, 16, 6, 6).expand(2, 16, 6, 6), *args)
    buf = torch.randn(2, 16, 6, 6)
    x_args = native_args(x=buf[:, :8], weight=torch.randn(8, 8, 3, 3))
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        torch.ops.cnnkernels._bn_act_conv_into_native(buf[:, :8], *x_args)
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        torch.ops.cnnkernels._bn_act_conv_into_native(x, *native_args(x=x, weight=torch.randn(8, 8, 3, 3)))


@native
def test_native_backward_names_the_argument():
    x, weight, bias, bn_weight, bn_bias, _, _, stride, padding, dilation, groups, _, eps, act = native_args()
    grad_out, mean, var = torch.randn(2, 16, 6, 6), torch.zeros(8), torch.ones(8)

    def backward(**overrides):
        args = dict(grad_out=grad_out, x=x, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias,
                    save_mean=mean, save_var=var, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    training=True, eps=eps, activation=act, output_mask=[True] * 5)
        args.update(overrides)
        return torch.ops.cnnkernels._bn_act_conv_backward_native(*args.values())

    assert backward()[0].shape == x.shape
    with pytest.raises(RuntimeError, match="grad_out must have the shape of the output"):
        backward(grad_out=torch.randn(2, 16, 5, 6))
    with pytest.raises(RuntimeError, match="save_var must have C_in = 8 elements"):
        backward(save_var=torch.ones(16))
