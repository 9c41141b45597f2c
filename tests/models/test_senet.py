"""SE-ResNet / SE-ResNeXt (models/senet.py) and cnnkernels.nn.SqueezeExcite.

There is no SE model in torchvision, and timm is no dependency of the project, so the
committed tests compare against a plain-torch formula of timm's SEModule and SE
Bottleneck, and against the key names and parameter counts timm reports.

Checked by hand against timm 1.0.31 (installed outside the project), for se_resnet50/
101/152, se_resnext50_32x4d and se_resnext101_32x4d vs timm's seresnet50/101/152,
seresnext50_32x4d, seresnext101_32x4d: identical state_dict keys (in order) and shapes;
parameter counts 28088024, 49326872, 66821848, 27559896, 48955416; timm's state_dict
(randomised BN and SE biases) loads with strict=True; with the helpers below, float64
se_resnet50 and se_resnext50 match timm to 1e-10 in eval and train outputs, 1e-8 in
every gradient, and in the buffers after the step; float32 eval outputs on 2x3x48x48
agree to 9e-6, 3e-5, 9e-5, 9e-7, 6e-7; cnnkernels.nn.convert() of timm's seresnet50
gives the same outputs (tests/nn/test_convert.py runs that where timm is installed).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels import models
from cnnkernels.models.resnet import Bottleneck
from cnnkernels.nn import SqueezeExcite
from cnnkernels.nn.squeeze_excite import make_divisible, squeeze_excite
from helpers import Formula, rel_err
from test_resnet_family import FIRST_BLOCKS_AND_ONE_OTHER, compare, compare_float32, randomize_batch_norms

SE_MODELS = {"se_resnet50": 28088024, "se_resnet101": 49326872, "se_resnet152": 66821848,
             "se_resnext50_32x4d": 27559896, "se_resnext101_32x4d": 48955416}
# timm seresnet50's keys of its first block, in order.
TIMM_BLOCK_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
    "conv3.weight", "bn3.weight", "bn3.bias", "bn3.running_mean", "bn3.running_var", "bn3.num_batches_tracked",
    "se.fc1.weight", "se.fc1.bias", "se.fc2.weight", "se.fc2.bias",
    "downsample.0.weight", "downsample.1.weight", "downsample.1.bias", "downsample.1.running_mean",
    "downsample.1.running_var", "downsample.1.num_batches_tracked"]


def se_formula(x, se):
    """timm's SEModule.forward written out: x * sigmoid(fc2(relu(fc1(mean_hw(x)))))."""
    s = x.mean((2, 3), keepdim=True)
    s = F.relu(F.conv2d(s, se.fc1.weight, se.fc1.bias))
    return x * torch.sigmoid(F.conv2d(s, se.fc2.weight, se.fc2.bias))


def block_formula(b, x):
    """timm's SE Bottleneck written out in plain torch."""
    out = F.relu(b.bn1(b.conv1(x)))
    out = F.relu(b.bn2(b.conv2(out)))
    out = se_formula(b.bn3(b.conv3(out)), b.se)
    identity = x if b.downsample is None else b.downsample[1](b.downsample[0](x))
    return F.relu(out + identity)


def network_formula(m, x):
    x = m.maxpool(F.relu(m.bn1(m.conv1(x))))
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for block in layer:
            x = block_formula(block, x)
    return m.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def se_model(name, dtype, seed=0, calibrate_hw=32):
    gen = torch.Generator().manual_seed(seed)
    model = models.create_model(name, num_classes=10).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqueezeExcite):  # biases away from 0: gates spread over (0, 1)
                m.fc1.bias.copy_(torch.randn(m.fc1.bias.shape, generator=gen) * 0.5)
                m.fc2.bias.copy_(torch.randn(m.fc2.bias.shape, generator=gen) * 0.5)
    randomize_batch_norms(model, gen, calibrate_hw)
    return model, gen


@pytest.mark.parametrize("name", sorted(SE_MODELS))
def test_timm_keys_and_parameter_counts(name):
    with torch.device("meta"):
        model = models.create_model(name)
    keys = list(model.state_dict())
    assert [k[len("layer1.0."):] for k in keys if k.startswith("layer1.0.")] == TIMM_BLOCK_KEYS
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert sum(p.numel() for p in model.parameters()) == SE_MODELS[name]
    for layer, (channels, reduced) in enumerate([(256, 16), (512, 32), (1024, 64), (2048, 128)], start=1):
        se = getattr(model, f"layer{layer}")[-1].se
        assert (se.fc1.in_channels, se.fc1.out_channels, se.fc2.out_channels) == (channels, reduced, channels)
    if name == "se_resnext50_32x4d":  # the alias builds the same network
        with torch.device("meta"):
            alias = models.create_model("se_resnext50")
        assert [(k, v.shape) for k, v in alias.state_dict().items()] == \
               [(k, v.shape) for k, v in model.state_dict().items()]


# se_resnet101/152 and se_resnext101_32x4d use the block configurations of se_resnet50 and
# se_resnext50_32x4d (only the block counts differ); their composition is checked whole.
@pytest.mark.parametrize("name", ["se_resnet50", "se_resnext50_32x4d"])
def test_blocks_match_the_plain_torch_formula_float64(name):
    """The first block of every stage and one other, with the model's weights, in float64."""
    model, gen = se_model(name, torch.float32, seed=1, calibrate_hw=None)
    for layer, index in FIRST_BLOCKS_AND_ONE_OTHER:
        block = getattr(model, layer)[index]
        assert isinstance(block, Bottleneck) and block.se is not None
        block = copy.deepcopy(block).double()
        x = torch.randn(4, block.conv1.in_channels, 2, 2, generator=gen, dtype=torch.float64)
        compare(block, Formula(block, block_formula), x, gen, out_tol=1e-12, grad_tol=1e-10, stat_tol=1e-12)


def test_whole_network_matches_the_plain_torch_formula_float64():
    model, gen = se_model("se_resnet50", torch.float64)
    x = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    compare(model, Formula(model, network_formula), x, gen, out_tol=1e-10, grad_tol=1e-8, stat_tol=1e-10)


@pytest.mark.parametrize("name", sorted(SE_MODELS))
def test_whole_network_matches_the_plain_torch_formula_float32(name):
    """Eval to 1e-4 (1e-3 at 101/152 layers); for the 50-layer ones the train-mode step to
    sanity bounds (float32 conditioning of deep networks on small inputs: see
    test_resnet_family; the exact checks are the float64 ones)."""
    model, gen = se_model(name, torch.float32)
    compare_float32(name, model, Formula(model, network_formula), gen)


def test_torch_compile_fullgraph_se_resnext50():
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    model = models.create_model("se_resnext50", num_classes=10)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    out, ref = torch.compile(model, backend=counting_aot_eager, fullgraph=True)(x), twin(x)
    out.sum().backward()
    ref.sum().backward()
    assert len(graphs) == 1
    assert rel_err(out, ref) < 1e-4
    assert rel_err(model.layer4[0].se.fc1.weight.grad, twin.layer4[0].se.fc1.weight.grad) < 1e-3
    torch._dynamo.reset()


# --- SqueezeExcite ------------------------------------------------------------------------

def test_make_divisible_is_timms_rule():
    assert [make_divisible(c / 16, 8, round_limit=0.0) for c in (64, 256, 512, 1024, 2048, 200, 184)] == \
           [8, 16, 32, 64, 128, 16, 8]
    assert make_divisible(184 / 16) == 16  # default round_limit 0.9 bumps 11.5 -> 8 up to 16
    assert SqueezeExcite(184).fc1.out_channels == 8 and SqueezeExcite(64, rd_channels=5).fc1.out_channels == 5


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_squeeze_excite_matches_the_formula(activation, residual, channels_last):
    gen = torch.Generator().manual_seed(0)
    se = SqueezeExcite(48).double()
    with torch.no_grad():
        se.fc1.bias.normal_(0, 0.5, generator=gen)
        se.fc2.bias.normal_(0, 0.5, generator=gen)
    x = torch.randn(3, 48, 5, 7, generator=gen, dtype=torch.float64)
    r = torch.randn(3, 48, 5, 7, generator=gen, dtype=torch.float64) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_(True) for t in (x, r) if t is not None]
    out = se(x, residual=r, activation=activation)
    want = se_formula(x, se) + (r if residual else 0)
    want = F.relu(want) if activation == "relu" else want
    assert out.shape == x.shape and rel_err(out, want) < 1e-12
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    tensors = inputs + list(se.parameters())
    for a, b in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(want, tensors, grad)):
        assert rel_err(a, b) < 1e-10
    assert list(se.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_squeeze_excite_checks_its_arguments():
    se = SqueezeExcite(16)
    x = torch.randn(2, 16, 3, 3)
    with pytest.raises(ValueError, match="activation"):
        se(x, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        se(x, residual=torch.randn(2, 16, 3, 4))
    with pytest.raises(ValueError, match="N, C, H, W"):
        squeeze_excite(x[0], se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)
    with pytest.raises(ValueError, match="1x1"):
        SqueezeExcite.from_modules(nn.Conv2d(16, 8, 3), nn.Conv2d(8, 16, 1))
    with pytest.raises(ValueError, match="C->R->C"):
        SqueezeExcite.from_modules(nn.Conv2d(16, 8, 1), nn.Conv2d(4, 16, 1))
    fc1, fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
    wrapped = SqueezeExcite.from_modules(fc1, fc2)
    assert wrapped.fc1 is fc1 and wrapped.fc2 is fc2
