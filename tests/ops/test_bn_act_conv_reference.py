"""The bn_act_conv reference against torch's own ops (F.batch_norm, relu, F.conv2d and
their autograd), in float64, forward and every gradient, train and eval."""
import itertools

import pytest
import torch

from bn_act_conv_cases import CASES, EPS, GRAD_NAMES, BnCase
from cnnkernels import reference
from helpers import rel_err, torch_bn_act_conv


def schema_args(inputs, case, training):
    return (*inputs, *case.schema_conv(), training, EPS, case.activation)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_torch(case, training):
    inputs = case.make(torch.float64)
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = inputs
    expected = torch_bn_act_conv(*inputs[:5], running_mean.clone(), running_var.clone(), training=training, eps=EPS,
                                 **case.kwargs())
    grad_out = torch.randn_like(expected)
    leaves = [t for t in inputs[:5] if t is not None]
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    args = schema_args(inputs, case, training)
    with torch.no_grad():
        out, save_mean, save_var = reference.bn_act_conv_forward(*args)
    fmt = torch.channels_last if case.channels_last_out else torch.contiguous_format
    assert reference.bn_act_conv_memory_format(x) == fmt
    assert out.is_contiguous(memory_format=fmt) and out.dtype == torch.float64
    assert rel_err(out, expected) < 1e-12
    if training:
        assert rel_err(save_mean, x.mean(dim=(0, 2, 3))) < 1e-12
        assert rel_err(save_var, x.var(dim=(0, 2, 3), unbiased=False)) < 1e-12
    else:
        assert torch.equal(save_mean, running_mean) and torch.equal(save_var, running_var)

    mask = [t is not None for t in inputs[:5]]
    with torch.no_grad():
        grads = reference.bn_act_conv_backward(grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var,
                                               *case.schema_conv(), training, EPS, case.activation, mask)
    got = [(name, g) for name, g, wanted in zip(GRAD_NAMES, grads, mask) if wanted]
    for (name, g), e in zip(got, expected_grads):
        assert g.shape == e.shape, name
        assert rel_err(g, e) < 1e-10, name
    assert grads[0].is_contiguous(memory_format=fmt)
    for g, wanted in zip(grads, mask):
        if not wanted:
            assert g.numel() == 0


@pytest.mark.parametrize("mask", [m for m in itertools.product([False, True], repeat=5) if sum(m) == 1],
                         ids=lambda m: "+".join(n for n, w in zip(GRAD_NAMES, m) if w))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_backward_computes_exactly_the_wanted_grads(mask, training):
    case = BnCase("bias", bias=True, layout="prefix_cl")
    inputs = case.make(torch.float64, requires_grad=False)
    out, save_mean, save_var = reference.bn_act_conv_forward(*schema_args(inputs, case, training))
    grad_out = torch.randn_like(out)
    full = reference.bn_act_conv_backward(grad_out, *inputs[:5], save_mean, save_var, *case.schema_conv(),
                                          training, EPS, case.activation, [True] * 5)
    some = reference.bn_act_conv_backward(grad_out, *inputs[:5], save_mean, save_var, *case.schema_conv(),
                                          training, EPS, case.activation, list(mask))
    for wanted, f, s in zip(mask, full, some):
        assert torch.equal(f, s) if wanted else s.numel() == 0
    assert some[3].dtype == some[4].dtype == torch.float64


def test_reference_into_writes_only_the_slice():
    case = BnCase("into", layout="prefix_cl", c_out=4)
    inputs = case.make(torch.float64, requires_grad=False)
    buf = torch.full((2, 20, 6, 6), float("nan"), dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = buf[:, 10:14]
    args = schema_args(inputs, case, True)
    save_mean, save_var = reference.bn_act_conv_into(out, *args)
    expected, mean, var = reference.bn_act_conv_forward(*args)
    assert torch.equal(out, expected) and torch.equal(save_mean, mean) and torch.equal(save_var, var)
    assert buf[:, :10].isnan().all() and buf[:, 14:].isnan().all()
