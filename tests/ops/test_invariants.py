"""Exact invariants every backend keeps, which whole-tensor relative errors can miss
(issue 14: a ReLU letting values just below zero through, or eps dropped from the eval
scale, survived the norm-based comparisons): ReLU outputs are never negative and exactly
zero where the pre-activation is clearly negative, the residual is added before the
activation, channels where eps dominates the variance are right channel by channel, a
constant channel in training normalises to beta, and running statistics follow torch's
BatchNorm over several steps, momentum None (the cumulative average) included."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels import ops
from helpers import skip_or_fail

BACKENDS = ["reference", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
MARGIN = 1e-5  # pre-activations closer to 0 than this may round either way in float32


def _near_zero(shape, generator) -> torch.Tensor:
    """Offsets of either sign, 1e-5 to 1e-3 in magnitude (log-uniform): pre-activations
    just below and above zero, where a sloppy ReLU shows."""
    magnitude = 10 ** (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 5)
    return torch.where(torch.rand(shape, generator=generator) < 0.5, -magnitude, magnitude)


def _device(backend):
    if backend == "cpu" and not cnnkernels._library.extension_loaded():
        skip_or_fail("cnnkernels._C is not built")
    return "cuda" if backend == "cuda" else "cpu"


def _conv_args(device, eps_dominated=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(2, 8, 6, 6, generator=gen), torch.randn(16, 8, 3, 3, generator=gen) * 0.2
    g, b = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    mean, var = torch.randn(16, generator=gen), torch.rand(16, generator=gen) + 0.5
    if eps_dominated:
        var[::2] = 1e-9  # eps (1e-3 below) is a million times the variance in every other channel
    res = torch.randn(2, 16, 6, 6, generator=gen) * 3
    return [t.to(device) for t in (x, w, g, b, mean, var, res)]


def _check_relu(out, pre):
    assert (out >= 0).all(), f"ReLU output has negatives down to {out.min().item():.3g}"
    assert (out[pre < -MARGIN] == 0).all(), "ReLU output not exactly 0 where the pre-activation is negative"
    assert (out[pre > MARGIN] > 0).all(), "ReLU output 0 where the pre-activation is positive"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_act_relu_after_the_residual_is_exact(backend, training):
    """Half the residual is chosen to put the pre-activation just below or above zero."""
    device = _device(backend)
    x, w, g, b, mean, var, res = _conv_args(device)
    ref_args = [t.double() for t in (x, w)] + [None] + [t.double() for t in (g, b)]
    with torch.no_grad(), cnnkernels.use_backend("reference"):
        bn_out = ops.conv_bn_act(*ref_args, mean.double().clone(), var.double().clone(), activation="none", padding=1,
                                 training=training, eps=1e-3)
    gen = torch.Generator().manual_seed(5)
    offsets = _near_zero(bn_out.shape, gen).to(device)
    res = torch.where(torch.rand(res.shape, generator=gen).to(device) < 0.5, (offsets - bn_out).float(), res)
    pre = bn_out + res.double()
    kwargs = dict(padding=1, training=training, eps=1e-3, residual=res)
    with torch.no_grad(), cnnkernels.use_backend(backend):
        out = ops.conv_bn_act(x, w, None, g, b, mean.clone(), var.clone(), activation="relu", **kwargs)
    assert (pre < -MARGIN).any() and (pre > MARGIN).any() and (res < 0).any()
    _check_relu(out.double(), pre)


def _bn_act_conv_near_zero_args(device):
    """x, gamma, beta, running mean/var (eval) of 8 channels with half of x chosen to put
    bn(x) just below or above zero, and bn(x) itself in float64."""
    gen = torch.Generator().manual_seed(1)
    x, g, b = torch.randn(2, 8, 5, 5, generator=gen), torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    mean, var = torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5
    per_channel = [t.double()[:, None, None] for t in (mean, var, g, b)]
    mean64, var64, g64, b64 = per_channel
    near = mean64 + (_near_zero(x.shape, gen) - b64) * (var64 + 1e-5).sqrt() / g64
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.5, near.float(), x)
    pre = (x.double() - mean64) / (var64 + 1e-5).sqrt() * g64 + b64
    return [t.to(device) for t in (x, g, b, mean, var)] + [pre.to(device)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_act_conv_prologue_relu_is_exact(backend):
    """A 1x1 identity convolution shows the activated input itself."""
    x, g, b, mean, var, pre = _bn_act_conv_near_zero_args(_device(backend))
    eye = torch.eye(8, device=x.device).reshape(8, 8, 1, 1)
    with torch.no_grad(), cnnkernels.use_backend(backend):
        out = ops.bn_act_conv(x, eye, None, g, b, mean, var, training=False, activation="relu")
    _check_relu(out.double(), pre)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_act_conv_eval_gradient_is_exactly_zero_below_the_relu(backend):
    """In eval the input gradient is grad_z * gamma / sqrt(var + eps) where bn(x) > 0 and
    exactly 0 where it is negative, however close to zero."""
    x, g, b, mean, var, pre = _bn_act_conv_near_zero_args(_device(backend))
    x.requires_grad_(True)
    w = torch.randn(6, 8, 3, 3, generator=torch.Generator().manual_seed(4)).to(x.device)
    with cnnkernels.use_backend(backend):
        out = ops.bn_act_conv(x, w, None, g, b, mean, var, padding=1, training=False, activation="relu")
        (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert (grad_x[pre < -MARGIN] == 0).all(), "gradient flows through the ReLU below zero"
    assert (grad_x[pre > MARGIN] != 0).float().mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_act_relu_is_exact_forward_and_backward(backend):
    """Half the residual puts x + residual just below or above zero: the output is exactly 0
    below, and both gradients are exactly grad_out above and 0 below."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 5, 5, generator=gen)
    res = torch.randn(x.shape, generator=gen) * 2
    res = torch.where(torch.rand(x.shape, generator=gen) < 0.5, (_near_zero(x.shape, gen) - x.double()).float(), res)
    pre = x.double() + res.double()
    x, res, pre = (t.to(device).requires_grad_(t.dtype == torch.float32) for t in (x, res, pre))
    grad_out = torch.rand(x.shape, generator=gen).to(device) + 0.5
    with cnnkernels.use_backend(backend):
        out = ops.add_act(x, res, activation="relu")
        grads = torch.autograd.grad(out, (x, res), grad_out)
    assert (pre.abs() < 1e-3).any()
    _check_relu(out.detach().double(), pre)
    for grad in grads:
        assert (grad[pre < -MARGIN] == 0).all(), "gradient flows through the ReLU below zero"
        assert torch.equal(grad[pre > MARGIN], grad_out[pre > MARGIN])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_scale_keeps_eps_channel_by_channel(backend):
    device = _device(backend)
    x, w, g, b, mean, var, _ = _conv_args(device, eps_dominated=True)
    with torch.no_grad(), cnnkernels.use_backend("reference"):
        ref = ops.conv_bn_act(x.double(), w.double(), None, g.double(), b.double(), mean.double(), var.double(),
                              padding=1, eps=1e-3, activation="none")
    with torch.no_grad(), cnnkernels.use_backend(backend):
        out = ops.conv_bn_act(x, w, None, g, b, mean, var, padding=1, eps=1e-3, activation="none")
    per_channel = ((out.double() - ref).flatten(2).norm(dim=2) / ref.flatten(2).norm(dim=2)).max(dim=0).values
    assert per_channel.max() < 1e-4, f"worst channel relative error {per_channel.max().item():.3g}"


@pytest.mark.parametrize("op", ["conv_bn_act", "bn_act_conv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_constant_channel_in_training_normalises_to_beta(backend, op):
    """Zero variance: (x - mean) is 0 and the scale 1/sqrt(eps) finite, so the output is beta
    (to the rounding of x * scale + (beta - mean * scale), as torch computes it: scale is
    about 300 here); without eps it would be inf * 0."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 4, 5, 5, generator=gen), torch.randn(6, 4, 1, 1, generator=gen)
    if op == "conv_bn_act":
        w[0] = 0  # conv channel 0 is constant (0)
        g, b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    else:
        x[:, 1] = 0.5  # input channel 1 is constant (exactly representable, so is its mean)
        w = torch.zeros(6, 4, 1, 1)
        w[0, 1] = 1.0  # output channel 0 is bn(x)[:, 1] itself
        g, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen).abs()
    x, w, g, b = (t.to(device) for t in (x, w, g, b))
    with torch.no_grad(), cnnkernels.use_backend(backend):
        out = getattr(ops, op)(x, w, None, g, b, None, None, training=True, activation="none" if op == "conv_bn_act"
                               else "relu")
    expected = b[0] if op == "conv_bn_act" else b[1]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 0], torch.full_like(out[:, 0], expected.item()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("module", ["ConvBNAct", "BNActConv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_follow_torch_over_steps(backend, module, momentum):
    device = _device(backend)
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).to(device)
    bn = nn.BatchNorm2d(6 if module == "ConvBNAct" else 4, momentum=momentum).to(device)
    fused = (cnnkernels.nn.ConvBNAct.from_modules(conv, bn) if module == "ConvBNAct"
             else cnnkernels.nn.BNActConv.from_modules(bn, conv))
    torch_bn = nn.BatchNorm2d(bn.num_features, momentum=momentum).to(device)
    torch_bn.load_state_dict(bn.state_dict())
    for step in range(4):
        x = torch.randn(3, 4, 5, 5, device=device) * (step + 1) + step
        with torch.no_grad(), cnnkernels.use_backend(backend):
            fused(x)
            torch_bn(conv(x) if module == "ConvBNAct" else x)
    assert bn.num_batches_tracked.item() == torch_bn.num_batches_tracked.item() == 4
    torch.testing.assert_close(bn.running_mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch_bn.running_var, rtol=1e-5, atol=1e-6)
