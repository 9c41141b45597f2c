"""cnnkernels.models registry (register_model / list_models / create_model), checkpoint
loading (load_weights), a forward + backward smoke test of the ResNet-family models, and
that no model leaves a residual add + activation unfused."""
import collections

import pytest
import torch
import torchvision

from torch.utils._python_dispatch import TorchDispatchMode

from cnnkernels import models
from cnnkernels.models import _registry

RESNET_FAMILY = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d", "se_resnext101_32x4d",
]
ALIASES = {"resnext50": "resnext50_32x4d", "se_resnext50": "se_resnext50_32x4d"}


def test_every_model_of_the_issue_is_registered():
    names = models.list_models()
    assert names == sorted(names)
    assert set(RESNET_FAMILY) | set(ALIASES) <= set(names)
    for alias, name in ALIASES.items():
        assert _registry._REGISTRY[alias] is _registry._REGISTRY[name]
    assert models.list_models("se_resnext*") == ["se_resnext101_32x4d", "se_resnext50", "se_resnext50_32x4d"]
    assert models.is_model("resnet50") and not models.is_model("resnet51")


def test_unknown_name_lists_close_matches_and_every_name():
    with pytest.raises(ValueError) as error:
        models.create_model("resnet51")
    message = str(error.value)
    assert "unknown model 'resnet51'" in message and "Did you mean" in message and "'resnet50'" in message
    assert all(name in message for name in RESNET_FAMILY)


def test_register_model_bare_with_name_and_aliases_and_no_duplicates(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", {})

    @models.register_model
    def tiny(**kwargs):
        return torch.nn.Linear(2, kwargs.get("num_classes", 3))

    @models.register_model(name="tiny_named", aliases=("tiny_alias",))
    def builder(**kwargs):
        return torch.nn.Linear(2, 2)

    assert models.list_models() == ["tiny", "tiny_alias", "tiny_named"]
    assert models.create_model("tiny", num_classes=5).out_features == 5
    assert models.register_model(tiny) is tiny  # the same builder again is harmless
    with pytest.raises(ValueError, match="already registered"):
        @models.register_model(name="tiny")
        def other(**kwargs):
            return torch.nn.Linear(2, 2)


@pytest.mark.parametrize("name", RESNET_FAMILY)
def test_forward_and_backward_smoke(name):
    model = models.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


class UnfusedAddAct(TorchDispatchMode):
    """Records every plain activation (aten) applied to the result of a plain add: a
    residual add + activation that should have been one fused op (conv_bn_act with a
    residual, se_excite with a residual, or add_act)."""

    ADDS = {"aten::add", "aten::add_"}
    ACTIVATIONS = {"aten::relu", "aten::relu_", "aten::hardtanh", "aten::hardtanh_", "aten::clamp_min",
                   "aten::clamp_min_", "aten::silu", "aten::silu_", "aten::gelu", "aten::threshold"}

    def __init__(self):
        super().__init__()
        self.sums, self.found, self.adds = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.ADDS:
            self.sums.append(out)
            self.adds += func._schema.name == "aten::add"  # out of place (add_ counts num_batches_tracked)
        elif func._schema.name in self.ACTIVATIONS and any(args[0] is t for t in self.sums):
            self.found.append(func)
        return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "se_resnet50", "preact_resnet18",
                                  "preact_resnet50"])
@pytest.mark.parametrize("training", [True, False])
def test_no_residual_add_is_followed_by_a_plain_activation(name, training):
    """The residual add + ReLU of ResNet / ResNeXt / SE blocks is inside the fused op of
    the block's last conv (or SE gate), and pre-activation ResNet's residual sums (one
    per block, no activation after them) are add_act ops: no plain add runs at all."""
    model = models.create_model(name, num_classes=7).train(training)
    with torch.set_grad_enabled(training), UnfusedAddAct() as recorder:
        model(torch.randn(2, 3, 32, 32))
    assert recorder.found == []
    assert recorder.adds == 0


# --- load_weights ---------------------------------------------------------------------------

def _small_state():
    tv = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_()
    return tv.state_dict()


def _assert_loaded(model, state):
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model", "module_prefix", "nested"])
def test_load_weights_reads_torchvision_and_timm_checkpoint_layouts(tmp_path, layout):
    state = _small_state()
    checkpoint = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 3, "arch": "resnet18"},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "module_prefix": collections.OrderedDict((f"module.{k}", v) for k, v in state.items()),
        "nested": {"model": {"state_dict": state}},
    }[layout]
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = models.create_model("resnet18", num_classes=4)
    result = models.load_weights(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_loaded(model, state)
    other = models.create_model("resnet18", num_classes=4, weights=str(path))  # the builders' weights=
    _assert_loaded(other, state)


def test_load_weights_accepts_checkpoints_without_num_batches_tracked():
    """torchvision's released ResNet checkpoints predate num_batches_tracked."""
    state = {k: v for k, v in _small_state().items() if not k.endswith("num_batches_tracked")}
    model = models.create_model("resnet18", num_classes=4)
    models.load_weights(model, state)
    _assert_loaded(model, state)


def test_load_weights_names_missing_unexpected_and_mismatched_keys(tmp_path):
    state = _small_state()
    broken = dict(state)
    del broken["layer1.0.conv1.weight"]
    broken["layer9.weight"] = torch.zeros(1)
    model = models.create_model("resnet18", num_classes=4)
    with pytest.raises(KeyError, match=r"1 missing keys \[layer1\.0\.conv1\.weight\].*"
                                       r"1 unexpected keys \[layer9\.weight\]"):
        models.load_weights(model, broken)
    result = models.load_weights(model, broken, strict=False)
    assert result.missing_keys == ["layer1.0.conv1.weight"] and result.unexpected_keys == ["layer9.weight"]
    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \(4, 512\) vs model \(10, 512\)"):
        models.load_weights(models.create_model("resnet18", num_classes=10), state)
    with pytest.raises(ValueError, match="no state_dict found"):
        models.load_weights(model, {"epoch": 1, "optimizer": {"lr": 0.1}})
    with pytest.raises(TypeError, match="path or a mapping"):
        models.load_weights(model, 42)


def test_load_weights_refuses_pickled_objects(tmp_path):
    """torch.load(weights_only=True): a checkpoint holding arbitrary objects is not executed."""
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _small_state(), "module": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        models.load_weights(models.create_model("resnet18", num_classes=4), path)


def test_every_registered_name_is_a_builder_attribute_like_torchvision():
    for name in models.list_models():
        assert getattr(models, name) is _registry._REGISTRY[name], name
    net = models.resnext50(num_classes=3)
    assert isinstance(net, torch.nn.Module) and net.fc.out_features == 3
    assert callable(models.alexnet) and callable(models.googlenet)
