"""cnnkernels.nn.convert: torchvision (and timm) models keep their state_dict and their
outputs after their Conv-BN(-ReLU) structures are swapped for the fused modules."""
import copy
import sys

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from cnnkernels.models.resnet import BasicBlock, Bottleneck, ResNet
from cnnkernels.nn import ConvBNAct, FusedSequential, Rule, SqueezeExcite, convert, register_rule
from helpers import rel_err

convert_module = sys.modules["cnnkernels.nn.convert"]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics (var in [0.5, 1.5])."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def check_same_function(converted, original, x, out_tol=1e-5, grad_tol=1e-4, train=True):
    """Eval output; then (train) one train-mode step: output, per-parameter gradients
    (relative, below grad_tol), buffers."""
    converted.eval(), original.eval()
    with torch.no_grad():
        assert rel_err(converted(x), original(x)) < out_tol
    if not train:
        return
    converted.train(), original.train()
    out, ref = converted(x), original(x)
    assert rel_err(out, ref) < out_tol
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    ref_params = dict(original.named_parameters())
    # A conv bias before a train-mode BN has a zero gradient (rounding noise only): each
    # gradient is measured relative to its own norm, floored at 1e-3 of the largest one.
    floor = 1e-3 * max(p.grad.norm().item() for p in original.parameters())
    for key, p in converted.named_parameters():
        want = ref_params[key].grad
        assert (p.grad - want).norm().item() <= grad_tol * max(want.norm().item(), floor), key
    ref_buffers = dict(original.named_buffers())
    for key, b in converted.named_buffers():
        assert rel_err(b.double(), ref_buffers[key].double()) < out_tol, key


def test_torchvision_resnet18_becomes_the_fused_resnet_with_the_same_tensors():
    model = randomize(torchvision.models.resnet18(num_classes=10))
    original = copy.deepcopy(model)
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    converted = convert(model)
    assert isinstance(converted, ResNet) and converted.training
    assert all(isinstance(b, BasicBlock) for layer in (converted.layer1, converted.layer4) for b in layer)
    assert {k: v.data_ptr() for k, v in converted.state_dict().items()} == tensors  # shared, same keys, same order
    assert converted.converted == {"": "torchvision_resnet", **{f"layer{i}.{j}": "torchvision_resnet_block"
                                                                for i in range(1, 5) for j in range(2)}}
    check_same_function(converted, original, torch.randn(2, 3, 48, 48), grad_tol=1e-3)
    assert convert(converted) is converted and len(converted.converted) == 9  # nothing left to convert


def test_torchvision_resnext50_blocks_and_stem():
    model = randomize(torchvision.models.resnext50_32x4d(num_classes=10)).eval()
    original = copy.deepcopy(model)
    converted = convert(model)
    assert not converted.training
    assert sum(isinstance(m, Bottleneck) for m in converted.modules()) == 16 and len(converted.converted) == 17
    assert converted.layer2[0].conv2.groups == 32 and converted.layer2[0].se is None
    # Deep float32 train-mode steps are ill-conditioned (see tests/models/test_resnet_family.py):
    # eval here; the blocks' train mode is checked in float64 there and below.
    check_same_function(converted, original, torch.randn(2, 3, 48, 48), out_tol=1e-4, train=False)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_a_bare_torchvision_block_is_returned_converted(block):
    from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck

    downsample = nn.Sequential(nn.Conv2d(32, 64 if block == "basic" else 256, 1, 2, bias=False),
                               nn.BatchNorm2d(64 if block == "basic" else 256))
    tv = (TvBasic(32, 64, 2, downsample) if block == "basic" else TvBottleneck(32, 64, 2, downsample, groups=4))
    tv = randomize(tv).double()
    original = copy.deepcopy(tv)
    converted = convert(tv)
    assert type(converted) is (BasicBlock if block == "basic" else Bottleneck) and converted.converted == {
        "": "torchvision_resnet_block"}
    assert converted.stride == 2
    check_same_function(converted, original, torch.randn(3, 32, 6, 6, dtype=torch.float64), 1e-12, 1e-10)


def test_unrecognised_structures_are_left_alone():
    from torchvision.models.resnet import BasicBlock as TvBasic

    gn_block = TvBasic(16, 16, norm_layer=lambda c: nn.GroupNorm(4, c))
    same_padding = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.BatchNorm2d(4), nn.ReLU())
    reflect = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4))
    mismatch = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(4))
    holder = nn.ModuleDict({"gn": gn_block, "same": same_padding, "reflect": reflect, "mismatch": mismatch})
    converted = convert(holder)
    assert converted is holder and converted.converted == {}
    assert converted["gn"] is gn_block and type(converted["same"]) is nn.Sequential


def test_basic_conv2d_of_inception_and_googlenet_becomes_conv_bn_act():
    from torchvision.models.inception import BasicConv2d

    block = randomize(BasicConv2d(8, 16, kernel_size=3, padding=1))
    original = copy.deepcopy(block)
    converted = convert(block)
    assert isinstance(converted, ConvBNAct) and converted.bn.eps == 0.001
    assert list(converted.state_dict()) == list(original.state_dict())
    check_same_function(converted, original, torch.randn(2, 8, 7, 7))

    # float64: the float32 train-mode step of a 22-layer network with many max-pools is
    # ill-conditioned (near-tied maxima flip), which would test rounding, not convert().
    net = randomize(torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True, dropout=0.0))
    net = net.double()
    original = copy.deepcopy(net)
    converted = convert(net)
    assert converted is net and len(converted.converted) == 57
    assert set(converted.converted.values()) == {"basic_conv2d"}
    assert list(converted.state_dict()) == list(original.state_dict())
    check_same_function(converted, original, torch.randn(2, 3, 64, 64, dtype=torch.float64), 1e-10, 1e-8)


def test_sequential_runs_keep_their_indices_and_fuse():
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # run 0-2
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8),  # run 4-5, no activation
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),  # followed by an in-place op: left
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5, inplace=True),  # left: in-place next
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))  # last run 13-14
    seq = randomize(seq).double()
    original = copy.deepcopy(seq)
    assert convert_module.fused_runs(list(seq)) == [(0, 3, "relu"), (4, 2, "none"), (13, 2, "none")]
    converted = convert(seq)
    assert isinstance(converted, FusedSequential) and converted.converted == {"": "sequential_conv_bn"}
    assert list(converted.state_dict()) == list(original.state_dict())
    assert converted[12].p == 0.5
    converted[12].p = original[12].p = 0.0  # dropout off for the comparison
    check_same_function(converted, original, torch.randn(2, 3, 8, 8, dtype=torch.float64), 1e-12, 1e-10)


def test_vgg_features_and_conv_norm_activation():
    features = torchvision.models.vgg.make_layers([16, "M", 32, 32, "M"], batch_norm=True)
    model = randomize(nn.Sequential(features, nn.Flatten(), nn.Linear(32 * 4 * 4, 10))).double()
    original = copy.deepcopy(model)
    converted = convert(model)
    assert converted is model and converted.converted == {"0": "sequential_conv_bn"}
    assert [k for k in converted.state_dict()][:3] == ["0.0.weight", "0.0.bias", "0.1.weight"]
    check_same_function(converted, original, torch.randn(4, 3, 16, 16, dtype=torch.float64), 1e-12, 1e-10)

    cna = Conv2dNormActivation(4, 8, 3)
    converted = convert(cna)
    assert isinstance(converted, FusedSequential) and converted.out_channels == 8


def test_mobilenet_v2_with_in_place_relu6_still_trains():
    """Conv-BN runs followed by an in-place ReLU6 are left unfused (the fused op keeps its
    output for backward); the rest converts and the train step runs. float32 (depthwise
    convs are very slow in float64 on CPU): eval to 1e-4, the train step loosely."""
    model = randomize(torchvision.models.mobilenet_v2(num_classes=10, dropout=0.0, width_mult=0.5))
    original = copy.deepcopy(model)
    converted = convert(model)
    assert set(converted.converted.values()) == {"sequential_conv_bn"} and len(converted.converted) == 17
    assert type(converted.features[0]) is Conv2dNormActivation  # Conv, BN, ReLU6(inplace): left
    assert isinstance(converted.features[2].conv, FusedSequential)
    check_same_function(converted, original, torch.randn(4, 3, 32, 32), out_tol=1e-4, train=False)
    converted.train(), original.train()
    x = torch.randn(4, 3, 32, 32)
    out, ref = converted(x), original(x)
    out.sum().backward()
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-2
    assert rel_err(converted.classifier[1].weight.grad, original.classifier[1].weight.grad) < 1e-2


def test_frozen_batch_norms_stay_in_eval_mode():
    model = torchvision.models.resnet18(num_classes=10)
    model.layer1[0].bn1.eval()
    converted = convert(model)
    assert converted.training and converted.layer1[0].training and not converted.layer1[0].bn1.training


def test_custom_rules_plug_in(monkeypatch):
    monkeypatch.setattr(convert_module, "RULES", list(convert_module.RULES))

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    rule = register_rule(Rule("twice_linear", lambda m: type(m) is nn.Linear, Twice), first=True)
    assert convert_module.RULES[0] is rule
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    converted = convert(model)
    assert isinstance(converted[0], Twice) and converted.converted == {"0": "twice_linear"}
    register_rule(Rule("twice_linear", lambda m: False, Twice))  # same name: replaced, moved last
    assert [r.name for r in convert_module.RULES].count("twice_linear") == 1
    assert convert_module.RULES[-1].name == "twice_linear"


def test_timm_se_resnet_blocks_when_timm_is_present():
    timm = pytest.importorskip("timm")  # not a dependency: checked where it is installed
    model = randomize(timm.create_model("seresnet50", num_classes=10)).eval()
    original = copy.deepcopy(model)
    converted = convert(model)
    assert set(converted.converted.values()) == {"timm_resnet_block"} and len(converted.converted) == 16
    assert isinstance(converted.layer1[0].se, SqueezeExcite)
    assert list(converted.state_dict()) == list(original.state_dict())
    check_same_function(converted, original, torch.randn(2, 3, 48, 48), out_tol=1e-4, train=False)
