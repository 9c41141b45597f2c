"""The C++ CPU kernels check their own arguments (reached by calling the _native ops
directly, past the Python checks): one table of (native op, overrides of a good call,
message) over every op's forward, backward and out= kernels. An override is a value, or
a function of the good arguments (in schema order) that returns one."""
import pytest
import torch

import cnnkernels  # noqa: F401  (loads cnnkernels._C when it is built)
from cnnkernels import _library
from helpers import skip_or_fail

EPS = 1e-5


def conv_bn_act_forward():
    gen = torch.Generator().manual_seed(14)
    return dict(x=torch.randn(2, 6, 7, 7, generator=gen), weight=torch.randn(8, 6, 3, 3, generator=gen),
                bias=torch.randn(8, generator=gen), bn_weight=torch.rand(8, generator=gen) + 0.5,
                bn_bias=torch.randn(8, generator=gen), running_mean=torch.randn(8, generator=gen),
                running_var=torch.rand(8, generator=gen) + 0.5, stride=[1, 1], padding=[1, 1], dilation=[1, 1],
                groups=1, training=True, eps=EPS, residual=torch.randn(2, 8, 7, 7, generator=gen),
                activation="relu")


def conv_bn_act_backward():
    f = dict(conv_bn_act_forward(), residual=None)
    out, conv_out, save_mean, save_var = torch.ops.cnnkernels._conv_bn_act_forward_native(*f.values())
    return dict(grad_out=torch.randn_like(out), out=out, x=f["x"], weight=f["weight"], bias=f["bias"],
                conv_out=conv_out, bn_weight=f["bn_weight"], save_mean=save_mean, save_var=save_var,
                stride=f["stride"], padding=f["padding"], dilation=f["dilation"], groups=1, training=True, eps=EPS,
                activation="relu", output_mask=[True] * 6)


def bn_act_conv_forward():
    return dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(16, 8, 3, 3), bias=None, bn_weight=torch.ones(8),
                bn_bias=torch.zeros(8), running_mean=torch.zeros(8), running_var=torch.ones(8), stride=[1, 1],
                padding=[1, 1], dilation=[1, 1], groups=1, training=False, eps=EPS, activation="relu")


def bn_act_conv_backward():
    f = bn_act_conv_forward()
    return dict(grad_out=torch.randn(2, 16, 6, 6), **{k: f[k] for k in list(f)[:5]}, save_mean=torch.zeros(8),
                save_var=torch.ones(8), **{k: f[k] for k in ("stride", "padding", "dilation", "groups")},
                training=True, eps=EPS, activation="relu", output_mask=[True] * 5)


def se_excite_forward():
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(2, 16, 5, 6, generator=gen), fc1_weight=torch.randn(4, 16, generator=gen),
                fc1_bias=torch.randn(4, generator=gen), fc2_weight=torch.randn(16, 4, generator=gen),
                fc2_bias=torch.randn(16, generator=gen), residual=torch.randn(2, 16, 5, 6, generator=gen),
                activation="none")


GOOD = {  # native op: good arguments in schema order, and what the first result's shape is
    "_conv_bn_act_forward_native": (conv_bn_act_forward, (2, 8, 7, 7)),
    "_conv_bn_act_backward_native": (conv_bn_act_backward, (2, 6, 7, 7)),
    "_bn_act_conv_forward_native": (bn_act_conv_forward, (2, 16, 6, 6)),
    "_bn_act_conv_into_native": (lambda: dict(out=torch.empty(2, 16, 6, 6), **bn_act_conv_forward()), (8,)),
    "_bn_act_conv_backward_native": (bn_act_conv_backward, (2, 8, 6, 6)),
    "_add_act_forward_native": (lambda: dict(x=torch.randn(2, 3), residual=torch.randn(2, 3), activation="relu"),
                                (2, 3)),
    "_add_act_backward_native": (lambda: dict(grad_out=torch.randn(2, 3), out=torch.randn(2, 3), activation="relu"),
                                 (2, 3)),
    "_se_excite_forward_native": (se_excite_forward, (2, 16, 5, 6)),
    "_scale_shift_act_into_native": (lambda: dict(z=torch.empty(2, 6, 5, 4), x=torch.randn(2, 6, 5, 4),
                                                  scale=torch.rand(6), shift=torch.randn(6), activation="relu"),
                                     None),
}


def call(native_op: str, **overrides):
    if not _library.has_native_kernel(native_op, "CPU"):
        skip_or_fail(f"cnnkernels._C with the CPU kernel {native_op} is not loaded")
    args = GOOD[native_op][0]()
    for name, value in overrides.items():
        args[name] = value(args) if callable(value) else value
    return getattr(torch.ops.cnnkernels, native_op)(*args.values())


CONV_FORWARD = "_conv_bn_act_forward_native"
CONV_BACKWARD = "_conv_bn_act_backward_native"
BN_FORWARD, BN_INTO, BN_BACKWARD = (f"_bn_act_conv_{kind}_native" for kind in ("forward", "into", "backward"))
ADD_FORWARD, ADD_BACKWARD = "_add_act_forward_native", "_add_act_backward_native"
SE_FORWARD = "_se_excite_forward_native"
SSA = "_scale_shift_act_into_native"
ERRORS = [
    (CONV_FORWARD, dict(x=torch.randn(6, 7, 7)), "x must be a 4-D tensor"),
    (CONV_FORWARD, dict(weight=torch.randn(8, 6, 3)), "weight must be a 4-D tensor"),
    (CONV_FORWARD, dict(x=torch.randint(0, 3, (2, 6, 7, 7))), "x must be a floating-point tensor"),
    (CONV_FORWARD, dict(weight=torch.randn(8, 6, 3, 3, dtype=torch.float64)), "weight must have the dtype of x"),
    (CONV_FORWARD, dict(weight=torch.randn(8, 4, 3, 3)), "weight must have C_in / groups = 6"),
    (CONV_FORWARD, dict(groups=4), "x has 6 channels, which groups=4 does not divide"),
    (CONV_FORWARD, dict(groups=0), "groups must be >= 1"),
    (CONV_FORWARD, dict(weight=torch.randn(9, 3, 3, 3), groups=2, bias=None, bn_weight=None, bn_bias=None,
                        running_mean=None, running_var=None, residual=None), "weight has 9 output channels"),
    (CONV_FORWARD, dict(bias=torch.zeros(7)), "bias must have C_out = 8 elements"),
    (CONV_FORWARD, dict(bias=torch.zeros(8, dtype=torch.float64)), "bias must have the dtype of x"),
    (CONV_FORWARD, dict(bn_weight=torch.ones(9)), "bn_weight must have C_out = 8 elements"),
    (CONV_FORWARD, dict(bn_bias=torch.zeros(8, 1)), "bn_bias must be a 1-D tensor"),
    (CONV_FORWARD, dict(running_mean=torch.zeros(3)), "running_mean must have C_out = 8 elements"),
    (CONV_FORWARD, dict(running_var=torch.ones(8, dtype=torch.int64)), "running_var must be a floating-point tensor"),
    (CONV_FORWARD, dict(training=False, running_var=None), "running_mean and running_var are required"),
    (CONV_FORWARD, dict(residual=torch.randn(2, 8, 7, 6)), "residual must have the shape of the output"),
    (CONV_FORWARD, dict(activation="gelu"), "activation must be \"relu\" or \"none\", got \"gelu\""),
    (CONV_FORWARD, dict(stride=[0, 0]), "stride values must be >= 1"),
    (CONV_FORWARD, dict(padding=[-1, -1]), "padding values must be >= 0"),
    (CONV_FORWARD, dict(dilation=[0, 0]), "dilation values must be >= 1"),
    (CONV_FORWARD, dict(padding=[0, 0], dilation=[4, 4]), "padded height .* is smaller than the dilated kernel"),
    (CONV_FORWARD, dict(eps=-1.0), "eps must be >= 0"),
    (CONV_FORWARD, dict(x=torch.randn(0, 6, 7, 7), residual=None), "training needs at least one value per channel"),
    (CONV_FORWARD, dict(bias=None, bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
                        residual=None, stride=[1, 1, 1]), "stride must have 2 values"),
    (CONV_BACKWARD, dict(grad_out=lambda a: a["grad_out"][:, :, :-1]), "grad_out must have the shape of the output"),
    (CONV_BACKWARD, dict(out=lambda a: a["out"][:1]), "out must have the shape of the output"),
    (CONV_BACKWARD, dict(conv_out=torch.empty(0)), "conv_out .* is required when training"),
    (CONV_BACKWARD, dict(conv_out=lambda a: a["conv_out"][:, :3]), "conv_out must have the shape of the output"),
    (CONV_BACKWARD, dict(save_mean=lambda a: a["save_mean"][:5]), "save_mean must have C_out = 8 elements"),
    (CONV_BACKWARD, dict(save_var=lambda a: a["save_var"].view(2, 4)), "save_var must be a 1-D tensor"),
    (CONV_BACKWARD, dict(bn_weight=torch.ones(3)), "bn_weight must have C_out = 8 elements"),
    (CONV_BACKWARD, dict(bias=torch.ones(8, dtype=torch.float16)), "bias must have the dtype of x"),
    (CONV_BACKWARD, dict(activation="sigmoid"), "activation must be"),
    (BN_FORWARD, dict(bn_weight=torch.ones(16)), "bn_weight must have C_in = 8 elements"),
    (BN_FORWARD, dict(running_var=torch.ones(3)), "running_var must have C_in = 8 elements"),
    (BN_FORWARD, dict(running_mean=None, running_var=None), "required when training=False"),
    (BN_FORWARD, dict(weight=torch.randn(16, 4, 3, 3)), "weight must have C_in / groups = 8"),
    (BN_FORWARD, dict(activation="tanh"), "activation must be"),
    (BN_FORWARD, dict(eps=-1.0), "eps must be >= 0"),
    (BN_FORWARD, dict(x=torch.randn(2, 8, 1, 1), padding=[0, 0]), "smaller than the dilated kernel"),
    (BN_INTO, dict(out=torch.empty(2, 16, 5, 6)), "out must have the shape of the output"),
    (BN_INTO, dict(out=torch.empty(2, 16, 6, 6, dtype=torch.float64)), "out must have the dtype of x"),
    (BN_INTO, dict(out=torch.empty(1, 16, 6, 6).expand(2, 16, 6, 6)), "internally overlapping"),
    (BN_INTO, dict(out=lambda a: torch.randn(2, 16, 6, 6)[:, :8], x=lambda a: a["out"], weight=torch.randn(8, 8, 3, 3)),
     "out must not overlap x"),
    (BN_INTO, dict(x=torch.randn(2, 8, 6, 6), out=lambda a: a["x"], weight=torch.randn(8, 8, 3, 3)),
     "out must not overlap x"),
    (BN_BACKWARD, dict(grad_out=torch.randn(2, 16, 5, 6)), "grad_out must have the shape of the output"),
    (BN_BACKWARD, dict(save_var=torch.ones(16)), "save_var must have C_in = 8 elements"),
    (SE_FORWARD, dict(fc2_weight=lambda a: a["fc2_weight"][:, :3]), "fc2_weight must have shape"),
    (SE_FORWARD, dict(fc1_bias=lambda a: a["fc1_bias"][:3]), "fc1_bias must have 4 elements"),
    (SE_FORWARD, dict(residual=lambda a: a["residual"][:1]), "residual must have the shape of x"),
    (SE_FORWARD, dict(activation="gelu"), "activation must be"),
    (SSA, dict(activation="gelu"), "activation must be"),
    (SSA, dict(x=torch.randn(6, 5, 4), z=torch.empty(6, 5, 4)), "x must be a 4-D tensor"),
    (SSA, dict(scale=torch.rand(5)), "scale must be a 1-D tensor of C = 6 elements"),
    (SSA, dict(shift=torch.randn(6, 1)), "shift must be a 1-D tensor of C = 6 elements"),
    (SSA, dict(scale=torch.rand(6, dtype=torch.float64)), "scale must be in the statistics dtype"),
    (SSA, dict(z=torch.empty(2, 6, 5, 3)), "z is .* expected"),
    (SSA, dict(z=torch.empty(2, 6, 5, 4, dtype=torch.bfloat16)), "z is .* expected"),
    (SSA, dict(z=torch.empty(2, 6, 4, 5).transpose(2, 3)), "z must be channels_last-contiguous"),
    (SSA, dict(z=torch.empty(1, 6, 5, 4).expand(2, 6, 5, 4)), "internally overlapping"),
    (SSA, dict(z=lambda a: a["x"]), "z must not overlap x"),
]
# add_act's forward(x=first, residual=second) and backward(grad_out=second, out=first) alike
for first, second, activation, forward_match, backward_match in [
    (torch.randn(2, 3), torch.randn(3, 2), "relu", "residual must have the shape of x",
     "grad_out must have the shape of out"),
    (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), "relu", "residual must have the dtype of x",
     "grad_out must have the dtype of out"),
    (torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 3)), "relu", "x must be a floating-point tensor",
     "out must be a floating-point tensor"),
    (torch.randn(2, 3), torch.randn(2, 3), "tanh", 'activation must be "relu" or "none"',
     'activation must be "relu" or "none"'),
    (torch.tensor(1.0), torch.tensor(1.0), "relu", "x must have at least 1 dimension",
     "out must have at least 1 dimension"),
]:
    ERRORS += [(ADD_FORWARD, dict(x=first, residual=second, activation=activation), forward_match),
               (ADD_BACKWARD, dict(grad_out=second, out=first, activation=activation), backward_match)]


@pytest.mark.parametrize("native_op, overrides, match", ERRORS,
                         ids=[f"{op[1:-7]}-{i}" for i, (op, _, _) in enumerate(ERRORS)])
def test_bad_argument_is_named(native_op, overrides, match):
    with pytest.raises(RuntimeError, match=match):
        call(native_op, **overrides)


@pytest.mark.parametrize("native_op", sorted(GOOD))
def test_good_arguments_run(native_op):
    result = call(native_op)
    if GOOD[native_op][1] is None:  # writes into its first argument, returns nothing
        assert result is None
        return
    first = result[0] if isinstance(result, (tuple, list)) else result
    assert first.shape == GOOD[native_op][1]
