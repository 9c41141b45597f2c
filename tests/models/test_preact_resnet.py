"""Pre-activation ResNet (models/preact_resnet.py, He et al. 2016 "Identity Mappings").

torchvision has no pre-activation ResNet, so the network is checked against a plain-torch
formula of the paper's design (fb.resnet.torch's preresnet layout): structure and
parameter counts from the architecture's arithmetic for every depth; outputs, gradients
and running statistics in eval and train, in float64, for the basic-block and the
bottleneck network (the deeper ones run the same code with more blocks; their forward
and backward are smoke-tested in test_registry.py); the untouched identity path; and
that every BN-ReLU-conv unit goes through the one swappable function bn_act_conv.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels import models
from cnnkernels.models import preact_resnet
from cnnkernels.models.preact_resnet import PreActBasicBlock, PreActBottleneck, PreActResNet
from helpers import Formula, rel_err
from test_resnet_family import compare, randomize_batch_norms

CONFIGS = {"preact_resnet18": (False, [2, 2, 2, 2]), "preact_resnet34": (False, [3, 4, 6, 3]),
           "preact_resnet50": (True, [3, 4, 6, 3]), "preact_resnet101": (True, [3, 4, 23, 3]),
           "preact_resnet152": (True, [3, 8, 36, 3])}


def block_formula(b, x):
    """The paper's unit: [BN-ReLU] shared with a projection shortcut, BN-ReLU-conv units, sum."""
    pre = x if b.bn1 is None else F.relu(b.bn1(x))
    shortcut = x if b.downsample is None else b.downsample(pre)
    out = b.conv1(pre)
    out = b.conv2(F.relu(b.bn2(out)))
    if isinstance(b, PreActBottleneck):
        out = b.conv3(F.relu(b.bn3(out)))
    return out + shortcut


def network_formula(m, x):
    x = m.maxpool(F.relu(m.bn1(m.conv1(x))))
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for block in layer:
            x = block_formula(block, x)
    x = F.relu(m.final_bn(x))
    return m.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def expected_parameters(bottleneck: bool, layers: list[int], num_classes: int = 1000) -> int:
    """Parameter count of the architecture, from its definition."""
    expansion = 4 if bottleneck else 1
    total = 3 * 64 * 49 + 2 * 64  # stem conv + BN
    c_in = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        c_out = planes * expansion
        for index in range(blocks):
            preact = not (stage == 0 and index == 0)
            total += 2 * c_in if preact else 0
            if bottleneck:
                total += c_in * planes + 2 * planes + 9 * planes * planes + 2 * planes + planes * c_out
            else:
                total += 9 * c_in * planes + 2 * planes + 9 * planes * planes
            if index == 0 and (stage > 0 or c_in != c_out):
                total += c_in * c_out  # projection shortcut: 1x1 conv, no BN
            c_in = c_out
    return total + 2 * c_in + c_in * num_classes + num_classes  # final BN, fc


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_structure_and_parameter_count(name):
    bottleneck, layers = CONFIGS[name]
    with torch.device("meta"):
        model = models.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(bottleneck, layers)
    block_type = PreActBottleneck if bottleneck else PreActBasicBlock
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == layers and all(isinstance(b, block_type) for s in stages for b in s)
    assert model.layer1[0].bn1 is None  # the stem already ends with BN-ReLU
    assert all(b.bn1 is not None for s in stages for b in s if b is not model.layer1[0])
    for stage in stages[1:]:
        assert type(stage[0].downsample) is nn.Conv2d and stage[0].downsample.stride == (2, 2)
        assert all(b.downsample is None for b in stage[1:])
    assert (model.layer1[0].downsample is not None) == bottleneck
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and "final_bn.running_var" in keys and keys[-1] == "fc.bias"
    assert "layer2.0.downsample.weight" in keys and "layer1.0.bn1.weight" not in keys


@pytest.mark.parametrize("name", ["preact_resnet18", "preact_resnet50"])
def test_matches_the_plain_torch_formula_float64(name):
    gen = torch.Generator().manual_seed(0)
    model = models.create_model(name, num_classes=10).double()
    randomize_batch_norms(model, gen)
    x = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    compare(model, Formula(model, network_formula), x, gen, out_tol=1e-10, grad_tol=1e-8, stat_tol=1e-10)


@pytest.mark.parametrize("block_type", [PreActBasicBlock, PreActBottleneck])
def test_identity_path_is_untouched(block_type):
    """With the residual branch's last conv zeroed, a unit without projection returns its
    input exactly, in train and eval: nothing (no BN, no ReLU) sits on the identity path."""
    channels = 64 * block_type.expansion
    block = block_type(channels, 64)
    with torch.no_grad():
        (block.conv3 if block_type is PreActBottleneck else block.conv2).weight.zero_()
    x = torch.randn(2, channels, 5, 5)
    for training in (True, False):
        block.train(training)
        assert torch.equal(block(x), x)


def test_every_preactivation_unit_goes_through_bn_act_conv(monkeypatch):
    """bn_act_conv is the one place to put a fused BN-ReLU-conv op."""
    calls = []
    original = preact_resnet.bn_act_conv

    def counting(bn, conv, x):
        calls.append(conv)
        return original(bn, conv, x)

    monkeypatch.setattr(preact_resnet, "bn_act_conv", counting)
    model = models.create_model("preact_resnet50", num_classes=10)
    model(torch.randn(2, 3, 32, 32))
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    shared = [b for b in blocks if b.bn1 is None or b.downsample is not None]  # conv1 on a shared pre-activation
    assert len(calls) == 3 * len(blocks) - len(shared) == 3 * 16 - 4
    assert len(set(map(id, calls))) == len(calls)


def test_the_stem_runs_the_fused_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountFused(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.cnnkernels.conv_bn_act.default:
                type(self).calls += 1
            return func(*args, **(kwargs or {}))

    model = models.create_model("preact_resnet18", num_classes=10)
    with CountFused():
        model(torch.randn(2, 3, 32, 32))
    assert CountFused.calls == 1


def test_norm_layer_must_build_batch_norm():
    with pytest.raises(TypeError, match="BatchNorm2d"):
        models.create_model("preact_resnet18", norm_layer=lambda c: nn.GroupNorm(4, c))
    model = models.create_model("preact_resnet18", norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3))
    assert model.final_bn.eps == 1e-3 and isinstance(model, PreActResNet)
