"""cnnkernels.nn.freeze: BatchNorm folded into the weights once, same results as unfrozen."""
import copy
import warnings

import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels import ops
from cnnkernels.nn import ConvBNAct, freeze, unfreeze
from cnnkernels.nn.freeze import is_frozen
from helpers import randomize_batchnorm, rel_err, skip_or_fail

CASES = {  # name: (ConvBNAct kwargs, input shape, residual, channels_last, dtype)
    "3x3_residual": (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), (2, 8, 9, 9), True, False,
                     torch.float32),
    "1x1_s2_bias_none": (dict(in_channels=16, out_channels=24, kernel_size=1, stride=2, bias=True,
                              activation="none"), (2, 16, 8, 8), False, False, torch.float32),
    "grouped_channels_last": (dict(in_channels=32, out_channels=32, kernel_size=3, padding=1, groups=8),
                              (2, 32, 7, 7), True, True, torch.float32),
    "float64_bias_relu": (dict(in_channels=6, out_channels=10, kernel_size=3, padding=1, bias=True),
                          (3, 6, 5, 5), False, False, torch.float64),
}


def make(case, seed=0):
    kwargs, shape, with_residual, channels_last, dtype = CASES[case]
    torch.manual_seed(seed)
    module = ConvBNAct(**kwargs).to(dtype)
    randomize_batchnorm(module, seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    residual = None
    if with_residual:
        with torch.no_grad():
            residual = torch.randn_like(module.eval()(x))
    return module.eval(), x, residual


def require_cpu_backend(module, x):
    conv, bn = module.conv, module.bn
    verdict = ops.explain("conv_bn_act", x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                          bn.running_var, stride=conv.stride, padding=conv.padding, groups=conv.groups)
    if verdict["backend"] != "cpu":
        skip_or_fail(f"the cpu backend cannot run here: {verdict['rejected'].get('cpu')}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_output_is_bitwise_the_unfrozen_output_on_the_cpu_backend(case):
    module, x, residual = make(case)
    require_cpu_backend(module, x)
    with torch.no_grad():
        plain = module(x, residual)
        freeze(module)
        first, second = module(x, residual), module(x, residual)
    assert is_frozen(module.bn)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert first.is_contiguous(memory_format=torch.channels_last) == plain.is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["3x3_residual", "float64_bias_relu"])
def test_frozen_output_matches_torch_modules_on_the_reference_backend(case):
    module, x, residual = make(case)
    conv, bn = module.conv, module.bn
    with torch.no_grad():
        want = bn(conv(x)) + (residual if residual is not None else 0)
        want = torch.relu(want) if module.activation == "relu" else want
        freeze(module)
        with cnnkernels.use_backend("reference"):
            got = module(x, residual)
    assert rel_err(got, want) < (1e-12 if x.dtype == torch.float64 else 1e-5)


def _weight_sized_multiplies(module, x, residual) -> int:
    with torch.profiler.profile(record_shapes=True) as prof:
        module(x, residual)
    shape = list(module.conv.weight.shape)
    return sum(1 for e in prof.events() if e.name == "aten::mul" and e.input_shapes and
               list(e.input_shapes[0]) == shape)


def test_frozen_calls_do_not_refold_the_weights():
    module, x, residual = make("3x3_residual")
    require_cpu_backend(module, x)
    with torch.no_grad():
        assert _weight_sized_multiplies(module, x, residual) >= 1  # the unfrozen path folds per call
        freeze(module)
        module(x, residual)  # builds the cache
        assert _weight_sized_multiplies(module, x, residual) == 0
        assert _weight_sized_multiplies(module, x, residual) == 0


@pytest.mark.parametrize("change", ["load_state_dict", "weight_copy", "running_var", "bn_bias", "to_float64"])
def test_cache_follows_every_change_of_the_parameters_and_statistics(change):
    module, x, residual = make("3x3_residual")
    freeze(module)
    with torch.no_grad():
        module(x, residual)
        if change == "load_state_dict":
            other, _, _ = make("3x3_residual", seed=1)
            module.load_state_dict(other.state_dict())
        elif change == "weight_copy":
            module.conv.weight.mul_(-0.5)
        elif change == "running_var":
            module.bn.running_var.add_(3.0)
        elif change == "bn_bias":
            module.bn.bias.sub_(1.0)
        elif change == "to_float64":
            module.double()
            x, residual = x.double(), residual.double()
        got = module(x, residual)
        twin = unfreeze(copy.deepcopy(module))
        assert not is_frozen(twin.bn)
        want = twin(x, residual)
    assert torch.equal(got, want)


def test_training_mode_and_wanted_gradients_take_the_plain_path():
    module, x, residual = make("3x3_residual")
    twin = copy.deepcopy(module)
    freeze(module)
    # eval with gradients wanted: the parameters get their gradients, as unfrozen
    out, ref = module(x, residual), twin(x, residual)
    assert torch.equal(out, ref)
    grads = torch.autograd.grad(out.sum(), [module.conv.weight, module.bn.weight])
    want = torch.autograd.grad(ref.sum(), [twin.conv.weight, twin.bn.weight])
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    # training: batch statistics and running-stat updates, as unfrozen
    module.train(), twin.train()
    assert torch.equal(module(x, residual), twin(x, residual))
    assert torch.equal(module.bn.running_mean, twin.bn.running_mean)
    assert torch.equal(module.bn.running_var, twin.bn.running_var)
    assert int(module.bn.num_batches_tracked) == int(twin.bn.num_batches_tracked) == 1


def test_cache_built_in_inference_mode_serves_no_grad_calls():
    module, x, residual = make("1x1_s2_bias_none")
    with torch.no_grad():
        want = module(x, residual)
    freeze(module)
    with torch.inference_mode():
        first = module(x, residual)
    with torch.no_grad():
        second = module(x, residual)
    assert rel_err(first, want) < 1e-6 and rel_err(second, want) < 1e-6


def test_freezing_inference_tensors_warns_that_the_frozen_path_cannot_run():
    """A model copied under inference_mode holds inference tensors (no version counters):
    freeze says so instead of leaving every call silently on the unfrozen path."""
    module, x, residual = make("1x1_s2_bias_none")
    with torch.inference_mode():
        inference_copy = copy.deepcopy(module)
    with pytest.warns(RuntimeWarning, match="inference tensors .* no convolution takes the frozen path"):
        freeze(inference_copy)
    with torch.no_grad():
        plain_copy = copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze(plain_copy)
        freeze(module)


def test_frozen_resnet_matches_unfrozen_and_unfreeze_clears_every_cache():
    from cnnkernels import models
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10).eval()
    randomize_batchnorm(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = net(x)
        freeze(net)
        frozen = net(x)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(is_frozen(m) for m in bns)
    assert rel_err(frozen, plain) < 1e-6
    unfreeze(net)
    assert not any(is_frozen(m) for m in bns)
    assert not any(hasattr(m, "_cnnkernels_freeze") for m in net.modules())
