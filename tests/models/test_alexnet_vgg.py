"""AlexNet, ZFNet and VGG: parity with torchvision (keys, parameter counts, eval and train
outputs, gradients, running statistics) and ZFNet's hand-computed shapes and parameters."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cnnkernels import models
from cnnkernels.models import vgg
from cnnkernels.nn import FusedSequential
from helpers import load_twin_state, rel_err, train_forward_alike

VGG_NAMES = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def module_grad_errors(ours: nn.Module, theirs: nn.Module) -> dict[str, float]:
    """{module name: ||our grads - their grads|| / ||their grads||} over each module's own
    parameters taken together (norms in the gradients' dtype: no float64 copies of
    VGG's 100M-weight classifier)."""
    errors = {}
    for (name, a), b in zip(ours.named_modules(), theirs.modules()):
        pairs = list(zip(a.parameters(recurse=False), b.parameters(recurse=False)))
        if pairs:
            diff = sum(torch.linalg.vector_norm(p.grad - q.grad) ** 2 for p, q in pairs) ** 0.5
            ref = sum(torch.linalg.vector_norm(q.grad) ** 2 for _, q in pairs) ** 0.5
            errors[name] = (diff / ref).item()
    return errors


def assert_parity(ours: nn.Module, theirs: nn.Module, x: torch.Tensor,
                  train_dtype: torch.dtype = torch.float64) -> None:
    """Loads torchvision's state_dict strictly into ours and compares: eval outputs in
    float32 (rel. error < 1e-4); then, in train_dtype, train outputs (same dropout
    masks), the input's gradient, every module's parameter gradients and the running
    statistics after the step (< 1e-4 in float32, < 1e-6 in float64). Training-mode
    BatchNorm over small batches is ill-conditioned in float32 (torchvision's own
    float32 input gradient can be far from its float64 one), hence float64 where the
    model is small enough. A module's weight and bias gradients are compared together:
    a conv bias in front of a training-mode BatchNorm has an exact gradient of 0, where
    both sides return rounding noise."""
    load_twin_state(ours, theirs)

    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-4

    tol = 1e-6 if train_dtype == torch.float64 else 1e-4
    out, ref, x_ours, x_theirs = train_forward_alike(ours, theirs, x, train_dtype)
    assert rel_err(out, ref) < tol
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(train_dtype)
    ref.backward(grad_out)
    out.backward(grad_out)
    assert rel_err(x_ours.grad, x_theirs.grad) < tol
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    for name, err in module_grad_errors(ours, theirs).items():
        assert err < tol, f"{name}: gradient error {err:.2e}"
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        assert rel_err(b.double(), c.double()) < tol, name


def test_alexnet_parity():
    torch.manual_seed(0)
    assert_parity(models.create_model("alexnet", num_classes=10), torchvision.models.alexnet(num_classes=10),
                  torch.randn(2, 3, 64, 64), train_dtype=torch.float32)


def test_alexnet_parameter_count_at_1000_classes():
    assert sum(p.numel() for p in models.create_model("alexnet").parameters()) == 61_100_840


def test_vgg_parity():
    """The whole network once (features, pooling, classifier, dropout); the variants
    differ only in `features`, checked for each below."""
    torch.manual_seed(0)
    theirs = torchvision.models.vgg11_bn(num_classes=10, init_weights=False)
    ours = models.create_model("vgg11_bn", num_classes=10, init_weights=False)
    assert_parity(ours, theirs, torch.randn(2, 3, 64, 64), train_dtype=torch.float64)


@pytest.mark.parametrize("name", VGG_NAMES)
def test_vgg_features_parity(name):
    torch.manual_seed(0)
    cfg, batch_norm = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[name[:5]], name.endswith("_bn")
    theirs = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[cfg], batch_norm=batch_norm)
    assert_parity(vgg.make_layers(vgg.CONFIGS[cfg], batch_norm=batch_norm), theirs, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", VGG_NAMES)
def test_vgg_keys_shapes_and_parameter_counts(name):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(num_classes=10)
        ours = models.create_model(name, num_classes=10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_vgg_bn_features_run_fused_and_plain_ones_do_not():
    with_bn = models.create_model("vgg11_bn", num_classes=10, init_weights=False)
    plain = models.create_model("vgg11", num_classes=10, init_weights=False)
    assert type(with_bn.features) is FusedSequential
    assert type(plain.features) is nn.Sequential
    # the fused path never calls the conv / bn modules themselves
    called = []
    for m in with_bn.features:
        m.register_forward_hook(lambda mod, args, out: called.append(type(mod).__name__))
    with torch.no_grad():
        with_bn.eval()(torch.randn(1, 3, 32, 32))
    assert called == ["MaxPool2d"] * 5


def test_vgg_parameter_counts_at_1000_classes():
    expected = {"vgg11": 132_863_336, "vgg13": 133_047_848, "vgg16": 138_357_544, "vgg19": 143_667_240,
                "vgg11_bn": 132_868_840, "vgg16_bn": 138_365_992}
    for name, count in expected.items():
        with torch.device("meta"):
            model = models.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name


def _zfnet_shapes_by_hand(h: int) -> list[tuple[int, int, int]]:
    """ZFNet's feature shapes after each conv / pool, from the output-size formula."""
    out = lambda size, k, s, p: (size + 2 * p - k) // s + 1  # noqa: E731
    h1 = out(h, 7, 2, 2)
    p1 = out(h1, 3, 2, 0)
    p2 = out(p1, 3, 2, 0)
    p3 = out(p2, 3, 2, 0)
    return [(64, h1, h1), (64, p1, p1), (192, p1, p1), (192, p2, p2), (512, p2, p2), (1024, p2, p2),
            (512, p2, p2), (512, p3, p3)]


def test_zfnet_shapes_at_227():
    model = models.create_model("zfnet", num_classes=10).eval()
    shapes = []
    for m in model.features:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 227, 227))
    assert shapes == _zfnet_shapes_by_hand(227)
    assert shapes[:2] == [(64, 113, 113), (64, 56, 56)] and shapes[-1] == (512, 13, 13)
    assert logits.shape == (1, 10)


def test_zfnet_parameters_by_hand():
    conv = lambda c_in, c_out, k: c_out * c_in * k * k + c_out  # noqa: E731
    fc = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    expected = (conv(3, 64, 7) + conv(64, 192, 5) + conv(192, 512, 3) + conv(512, 1024, 3) + conv(1024, 512, 3)
                + fc(512 * 6 * 6, 4096) + fc(4096, 4096) + fc(4096, 1000))
    model = models.create_model("zfnet")
    assert sum(p.numel() for p in model.parameters()) == expected == 107_020_712
    assert model.features[0].kernel_size == (7, 7) and model.features[0].stride == (2, 2)


def test_zfnet_forward_backward_smoke():
    torch.manual_seed(0)
    model = models.create_model("zfnet", num_classes=10).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.features[0].weight.grad.abs().sum() > 0


def test_builders_accept_a_state_dict_as_weights():
    theirs = torchvision.models.alexnet(num_classes=10)
    ours = models.create_model("alexnet", num_classes=10, weights=theirs.state_dict())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
