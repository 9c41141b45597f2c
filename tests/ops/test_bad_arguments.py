"""Bad input to any public op gets a clear error naming the argument, and nothing runs:
one table of (op, overrides of a good call, error, message) over every op. An override
is a value, or a function of the good arguments that returns one. The C++ kernels' own
checks are in test_native_cpu_arguments.py."""
import pytest
import torch

from cnnkernels import ops


def conv_arguments(bn_channels: int) -> dict:
    """Good arguments of conv_bn_act / bn_act_conv: x [2, 8, 6, 6], weight [16, 8, 3, 3],
    padding 1, BN parameters and running statistics of bn_channels."""
    return dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(16, 8, 3, 3), bn_weight=torch.ones(bn_channels),
                bn_bias=torch.zeros(bn_channels), running_mean=torch.zeros(bn_channels),
                running_var=torch.ones(bn_channels), padding=1)


GOOD = {  # op: good arguments (x first) and the output shape they give
    "conv_bn_act": (lambda: conv_arguments(16), (2, 16, 6, 6)),
    "bn_act_conv": (lambda: conv_arguments(8), (2, 16, 6, 6)),
    "add_act": (lambda: dict(x=torch.randn(2, 4, 3, 3), residual=torch.randn(2, 4, 3, 3), activation="relu"),
                (2, 4, 3, 3)),
    "se_excite": (lambda: dict(x=torch.randn(2, 16, 5, 6), fc1_weight=torch.randn(4, 16), fc1_bias=torch.randn(4),
                               fc2_weight=torch.randn(16, 4), fc2_bias=torch.randn(16),
                               residual=torch.randn(2, 16, 5, 6)), (2, 16, 5, 6)),
}


def call(op: str, **overrides):
    """ops.<op> on its good arguments with `overrides` applied."""
    args = GOOD[op][0]()
    for name, value in overrides.items():
        args[name] = value(args) if callable(value) else value
    return getattr(ops, op)(args.pop("x"), **args)


# (overrides, error, match) that conv_bn_act and bn_act_conv reject alike.
CONV_ERRORS = [
    (dict(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
    (dict(weight=torch.randn(16, 8, 3)), ValueError, "weight must be 4-D"),
    (dict(x=torch.randint(0, 5, (2, 8, 6, 6))), TypeError, "x must be a floating tensor"),
    (dict(weight=torch.randn(16, 8, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (dict(weight=torch.randn(16, 4, 3, 3)), ValueError, "x has 8 channels but weight expects 4"),
    (dict(weight=torch.randn(16, 3, 3, 3), groups=3), ValueError, "groups=3 must divide"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(groups=True), ValueError, "groups must be a positive int"),
    (dict(eps=-1e-5), ValueError, "eps must be a number >= 0"),
    (dict(momentum=None, training=True), TypeError, "momentum must be a float"),
    (dict(bias=torch.zeros(15)), ValueError, r"bias must have 16 elements \(one per output channel\), got 15"),
    (dict(activation="gelu"), ValueError, "activation must be one of 'relu', 'none'"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (dict(dilation=-1), ValueError, "dilation must be >= 1"),
    (dict(running_mean=None), ValueError, "running_mean and running_var must be given together"),
    (dict(running_mean=None, running_var=None), ValueError, "required when training=False"),
    (dict(padding=0, x=torch.randn(2, 8, 2, 2)), ValueError, "does not fit"),
    (dict(x=torch.randn(1, 8, 1, 1), weight=torch.randn(16, 8, 1, 1), padding=0, training=True),
     ValueError, "more than 1 value per channel"),
]
ERRORS = [("conv_bn_act", *row) for row in CONV_ERRORS] + [("bn_act_conv", *row) for row in CONV_ERRORS] + [
    ("conv_bn_act", dict(bn_weight=torch.ones(15)), ValueError, "bn_weight must have 16 elements"),
    ("conv_bn_act", dict(running_var=torch.ones(17)), ValueError, "running_var must have 16 elements"),
    ("conv_bn_act", dict(bn_bias=torch.zeros(16, dtype=torch.float64)), TypeError, "bn_bias must be float32"),
    ("conv_bn_act", dict(residual=torch.randn(2, 16, 5, 5)), ValueError, "residual must have the output's shape"),
    ("conv_bn_act", dict(residual=torch.randn(2, 16, 6, 6, dtype=torch.float64)), TypeError, "residual has dtype"),
    ("conv_bn_act", dict(bn_weight=torch.ones(16, device="meta")), ValueError,
     "bn_weight is on meta but x is on cpu; they must be on one device"),
    ("bn_act_conv", dict(bn_weight=torch.ones(16)), ValueError,
     r"bn_weight must have 8 elements \(one per channel of x\)"),
    ("bn_act_conv", dict(running_var=torch.ones(17)), ValueError, "running_var must have 8 elements"),
    ("bn_act_conv", dict(running_mean=torch.zeros(8, 1)), ValueError, "running_mean must be 1-D"),
    ("bn_act_conv", dict(bn_bias=torch.zeros(8, dtype=torch.float64)), TypeError, "bn_bias must be float32"),
    ("bn_act_conv", dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    ("bn_act_conv", dict(out=torch.empty(2, 16, 5, 5)), ValueError, "out must have the output's shape"),
    ("bn_act_conv", dict(out=torch.empty(2, 16, 6, 6, dtype=torch.float64)), TypeError,
     "out has dtype torch.float64"),
    ("bn_act_conv", dict(out=torch.empty(2, 16, 6, 6, device="meta")), ValueError, "out is on meta"),
    ("bn_act_conv", dict(out=torch.empty(16, 6, 6)), ValueError, "out must be 4-D"),
    ("bn_act_conv", dict(out=torch.empty(2, 16, 6, 6), weight=torch.randn(16, 8, 3, 3, requires_grad=True)),
     RuntimeError, r"does not record autograd.*torch.no_grad\(\)"),
    ("bn_act_conv", dict(bn_weight=torch.ones(8, device="meta")), ValueError,
     "bn_weight is on meta but x is on cpu; they must be on one device"),
    ("bn_act_conv", dict(x=lambda a: torch.randn(2, 16, 6, 6)[:, :8], weight=torch.randn(8, 8, 1, 1),
                         padding=0, out=lambda a: a["x"]._base[:, :8]), ValueError, "out must not overlap x"),
    ("add_act", dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ("add_act", dict(residual=None), TypeError, "residual must be a torch.Tensor"),
    ("add_act", dict(x=torch.randint(0, 5, (2, 4, 3, 3))), TypeError, "x must be a floating tensor"),
    ("add_act", dict(residual=torch.randn(2, 4, 3, 3, dtype=torch.float64)), TypeError,
     "residual has dtype torch.float64 but x has torch.float32; they must match"),
    ("add_act", dict(residual=torch.randn(2, 4, 3, 4)), ValueError, r"residual must have x's shape \(2, 4, 3, 3\)"),
    ("add_act", dict(residual=torch.randn(4, 3, 3)), ValueError, "residual must have x's shape"),
    ("add_act", dict(x=torch.tensor(1.0), residual=torch.tensor(1.0)), ValueError,
     "x must have at least 1 dimension"),
    ("add_act", dict(activation="gelu"), ValueError, "activation must be one of 'relu', 'none'"),
    ("add_act", dict(residual=torch.randn(2, 4, 3, 3, device="meta")), ValueError,
     "residual is on meta but x is on cpu; they must be on one device"),
    ("se_excite", dict(x=lambda a: a["x"][0]), ValueError, "x must be 4-D"),
    ("se_excite", dict(x=lambda a: a["x"].int()), TypeError, "x must be a floating tensor"),
    ("se_excite", dict(fc1_weight=lambda a: a["fc1_weight"][:, :5]), ValueError, "fc1_weight must have shape"),
    ("se_excite", dict(fc1_weight=lambda a: a["fc1_weight"][:, :, None, None].expand(-1, -1, 3, 3)), ValueError,
     "fc1_weight must be"),
    ("se_excite", dict(fc1_weight=lambda a: a["fc1_weight"].double()), TypeError, "fc1_weight has dtype"),
    ("se_excite", dict(fc1_bias=lambda a: a["fc1_bias"][:3]), ValueError, "fc1_bias must have 4 elements"),
    ("se_excite", dict(fc2_weight=lambda a: a["fc2_weight"][:, :3]), ValueError, "fc2_weight must have shape"),
    ("se_excite", dict(fc2_weight=lambda a: a["fc2_weight"][:5]), ValueError, "fc2_weight must have shape"),
    ("se_excite", dict(fc2_bias=lambda a: a["fc2_bias"][None]), ValueError, "fc2_bias must be 1-D"),
    ("se_excite", dict(residual=lambda a: a["residual"][:, :3]), ValueError, "residual must have x's shape"),
    ("se_excite", dict(residual=lambda a: a["residual"].double()), TypeError, "residual has dtype"),
    ("se_excite", dict(x=lambda a: a["x"][:, :, :0]), ValueError, "at least one channel and one pixel"),
    ("se_excite", dict(activation="gelu"), ValueError, "activation must be one of"),
]


@pytest.mark.parametrize("op, overrides, error, match", ERRORS,
                         ids=[f"{op}-{i}-{match[:30]}" for i, (op, _, _, match) in enumerate(ERRORS)])
def test_bad_argument_is_named(op, overrides, error, match):
    with pytest.raises(error, match=r"(?<!\w)" + match):  # the name whole: "x", not the end of "XXxXX"
        call(op, **overrides)


@pytest.mark.parametrize("op", sorted(GOOD))
def test_good_arguments_run(op):
    assert call(op).shape == GOOD[op][1]


def test_out_is_returned_and_accepts_inputs_that_require_grad_under_no_grad():
    out = torch.empty(2, 16, 6, 6)
    assert call("bn_act_conv", out=out) is out
    with torch.no_grad():
        assert call("bn_act_conv", out=out, weight=torch.randn(16, 8, 3, 3, requires_grad=True)) is out


@pytest.mark.gpu  # a device mismatch needs a second device (CUDA)
@pytest.mark.parametrize("op", ["conv_bn_act", "bn_act_conv"])
def test_device_mismatch_is_named(op):
    with pytest.raises(ValueError, match="weight is on cuda"):
        call(op, weight=torch.randn(16, 8, 3, 3, device="cuda"))


def test_activation_is_keyword_only():
    with pytest.raises(TypeError):
        ops.add_act(torch.randn(3), torch.randn(3), "none")
