"""The conv_bn_act reference (cnnkernels.reference) against torch's own ops, in float64:
forward, saved statistics and every gradient, train and eval."""
import pytest
import torch
import torch.nn.functional as F

from cnnkernels import reference
from helpers import CASES, rel_err, torch_conv_bn_act


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_torch(case, training):
    inputs = case.make(torch.float64)
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = inputs
    expected = torch_conv_bn_act(*inputs[:5], running_mean.clone(), running_var.clone(), training=training,
                                 residual=residual, **case.kwargs())
    grad_out = torch.randn_like(expected)
    grad_inputs = [t for t in (x, weight, bias, bn_weight, bn_bias, residual) if t is not None]
    expected_grads = torch.autograd.grad(expected, grad_inputs, grad_out)

    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, [case.stride] * 2,
            [case.padding] * 2, [case.dilation] * 2, case.groups, training, 1e-5, residual, case.activation)
    with torch.no_grad():
        out, conv_out, save_mean, save_var = reference.conv_bn_act_forward(*args)
    assert out.is_contiguous(memory_format=reference.output_memory_format(x))
    assert rel_err(out, expected) < 1e-12
    if training:
        y = F.conv2d(x, weight, bias, case.stride, case.padding, case.dilation, case.groups)
        assert rel_err(save_mean, y.mean(dim=(0, 2, 3))) < 1e-12
        assert rel_err(save_var, y.var(dim=(0, 2, 3), unbiased=False)) < 1e-12
    else:
        assert conv_out.numel() == 0
    mask = [x is not None for x in (x, weight, bias, bn_weight, bn_bias, residual)]
    with torch.no_grad():
        grads = reference.conv_bn_act_backward(
            grad_out, out, x, weight, bias, conv_out, bn_weight, save_mean, save_var, *args[7:12], 1e-5,
            case.activation, mask)
    names = ("x", "weight", "bias", "bn_weight", "bn_bias", "residual")
    got = [(name, g) for name, g, wanted in zip(names, grads, mask) if wanted]
    assert len(got) == len(expected_grads)
    for (name, g), e in zip(got, expected_grads):
        if name == "bias" and training:  # batch statistics cancel a conv bias: its gradient is 0
            assert g.norm() < 1e-10 * grad_out.norm() and e.norm() < 1e-10 * grad_out.norm()
        else:
            assert rel_err(g, e) < 1e-10, name
    for g, wanted in zip(grads, mask):
        if not wanted:
            assert g.numel() == 0
