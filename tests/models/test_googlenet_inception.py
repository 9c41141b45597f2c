"""GoogLeNet, Inception v3 (parity with torchvision, aux heads, the 0.3-weighted loss) and
BN-Inception (shapes and parameters from the paper's table, forward/backward smoke)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cnnkernels import models
from cnnkernels.models.googlenet import GoogLeNetOutputs, googlenet_loss
from cnnkernels.models.inception import InceptionOutputs
from cnnkernels.nn import ConvBNAct
from helpers import assert_same_gradients, load_twin_state, rel_err, train_forward_alike


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, tuple) else (out,)


def assert_parity(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, backward: bool = True) -> None:
    """torchvision's state_dict loads strictly; eval outputs agree in float32 (< 1e-4);
    in float64 (training-mode BatchNorm over small batches is ill-conditioned in
    float32), train outputs (same namedtuple type and fields, same dropout masks), the
    running statistics and, with `backward`, the input's and every parameter's
    gradient agree (< 1e-6)."""
    load_twin_state(ours, theirs)

    ours.eval(), theirs.eval()
    with torch.no_grad():
        out, ref = ours(x), theirs(x)
    assert isinstance(out, torch.Tensor) and rel_err(out, ref) < 1e-4

    out, ref, x_ours, x_theirs = train_forward_alike(ours, theirs, x)
    assert getattr(type(out), "_fields", None) == getattr(type(ref), "_fields", None)
    gen = torch.Generator().manual_seed(2)
    loss_ours = loss_theirs = 0
    for o, r in zip(as_tuple(out), as_tuple(ref), strict=True):
        assert rel_err(o, r) < 1e-6
        weight = torch.randn(r.shape, generator=gen, dtype=torch.float64)
        loss_ours, loss_theirs = loss_ours + (o * weight).sum(), loss_theirs + (r * weight).sum()
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        assert rel_err(b.double(), c.double()) < 1e-6, name
    if not backward:
        return
    assert_same_gradients(ours, theirs, loss_ours, loss_theirs, [(x_ours, x_theirs)], 1e-6,
                          torch.ones((), dtype=torch.float64))


# --- GoogLeNet ---------------------------------------------------------------------------

def test_googlenet_parity_with_aux_heads():
    torch.manual_seed(0)
    theirs = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True)
    assert_parity(models.create_model("googlenet", num_classes=10), theirs, torch.randn(2, 3, 64, 64))


def test_googlenet_keys_without_aux_heads():
    with torch.device("meta"):
        theirs = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False)
        ours = models.create_model("googlenet", num_classes=10, aux_logits=False, init_weights=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 6_624_904 - 1024 * 990 - 990  # torchvision: 6,624,904 at 1000


def test_googlenet_outputs_in_train_and_eval():
    torch.manual_seed(0)
    model = models.create_model("googlenet", num_classes=7).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert isinstance(out, GoogLeNetOutputs) and out._fields == ("logits", "aux_logits2", "aux_logits1")
    assert all(t.shape == (2, 7) for t in out)
    with torch.no_grad():
        assert isinstance(model.eval()(x), torch.Tensor)
    no_aux = models.create_model("googlenet", num_classes=7, aux_logits=False).train()
    assert isinstance(no_aux(x), torch.Tensor) and no_aux.aux1 is None and no_aux.aux2 is None


def test_googlenet_basic_convs_are_fused_conv_bn_act_with_eps_0001():
    model = models.create_model("googlenet", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 59
    assert all(c.bn.eps == 0.001 and c.activation == "relu" and c.conv.bias is None for c in convs)


def test_googlenet_loss_is_main_plus_03_aux():
    torch.manual_seed(0)
    model = models.create_model("googlenet", num_classes=5).train()
    target = torch.tensor([0, 3])
    out = model(torch.randn(2, 3, 64, 64))
    loss = googlenet_loss(out, target)
    expected = F.cross_entropy(out.logits, target) + 0.3 * (F.cross_entropy(out.aux_logits1, target)
                                                             + F.cross_entropy(out.aux_logits2, target))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert model.aux1.fc2.weight.grad.abs().sum() > 0 and model.aux2.fc2.weight.grad.abs().sum() > 0
    assert googlenet_loss(out.logits, target) == F.cross_entropy(out.logits, target)
    assert torch.allclose(googlenet_loss(out, target, aux_weight=0.0), F.cross_entropy(out.logits, target))


# --- Inception v3 ------------------------------------------------------------------------

def test_inception_v3_parity_without_aux_at_75():
    torch.manual_seed(0)
    theirs = torchvision.models.inception_v3(num_classes=10, aux_logits=False, init_weights=True)
    ours = models.create_model("inception_v3", num_classes=10, aux_logits=False)
    assert_parity(ours, theirs, torch.randn(2, 3, 75, 75))


def test_inception_v3_parity_with_aux_at_299():
    """The aux head needs the 17x17 grid of a 299x299 input; forward only (the trunk's
    gradients are checked at 75x75 above, the aux head's below)."""
    torch.manual_seed(0)
    theirs = torchvision.models.inception_v3(num_classes=10, aux_logits=True, init_weights=True)
    ours = models.create_model("inception_v3", num_classes=10, init_weights=False)
    assert_parity(ours, theirs, torch.randn(2, 3, 299, 299), backward=False)


def test_inception_v3_aux_head_parity():
    from torchvision.models.inception import InceptionAux as TheirAux

    from cnnkernels.models.inception import InceptionAux
    torch.manual_seed(0)
    assert_parity(InceptionAux(768, 10), TheirAux(768, 10), torch.randn(2, 768, 17, 17))


def test_inception_v3_structure():
    with torch.device("meta"):
        model = models.create_model("inception_v3", init_weights=False)
    assert sum(p.numel() for p in model.parameters()) == 27_161_264
    convs = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 96
    assert all(c.bn.eps == 0.001 for c in convs)
    assert InceptionOutputs._fields == ("logits", "aux_logits")


# --- BN-Inception ------------------------------------------------------------------------

# Ioffe & Szegedy 2015, Figure 5: #1x1, #3x3 reduce, #3x3, double #3x3 reduce,
# double #3x3, pool projection (None: pass-through), stride.
PAPER_TABLE = [
    (64, 64, 64, 64, 96, 32, 1), (64, 64, 96, 64, 96, 64, 1), (0, 128, 160, 64, 96, None, 2),
    (224, 64, 96, 96, 128, 128, 1), (192, 96, 128, 96, 128, 128, 1), (160, 128, 160, 128, 160, 128, 1),
    (96, 128, 192, 160, 192, 128, 1), (0, 128, 192, 192, 256, None, 2),
    (352, 192, 320, 160, 224, 128, 1), (352, 192, 320, 192, 224, 128, 1),
]


def _bn_inception_by_hand(num_classes: int) -> tuple[int, list[int]]:
    """Parameter count (conv weights + BN gamma/beta, linear) and block output channels."""
    conv = lambda c_in, c_out, k: c_in * c_out * k * k + 2 * c_out  # noqa: E731
    params = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3)
    c, widths = 192, []
    for n1, r3, n3, rd, nd, proj, _ in PAPER_TABLE:
        params += (conv(c, n1, 1) if n1 else 0) + conv(c, r3, 1) + conv(r3, n3, 3)
        params += conv(c, rd, 1) + conv(rd, nd, 3) + conv(nd, nd, 3) + (conv(c, proj, 1) if proj else 0)
        c = n1 + n3 + nd + (proj if proj else c)
        widths.append(c)
    return params + c * num_classes + num_classes, widths


def test_bn_inception_parameters_and_widths_match_the_paper_table():
    params, widths = _bn_inception_by_hand(1000)
    assert widths == [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
    model = models.create_model("bn_inception")
    assert sum(p.numel() for p in model.parameters()) == params == 11_285_224
    assert sum(p.numel() for p in models.create_model("bn_inception", num_classes=10).parameters()) == \
        _bn_inception_by_hand(10)[0]


def test_bn_inception_batchnorm_after_every_conv_and_no_5x5():
    model = models.create_model("bn_inception", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, ConvBNAct) for m in model.modules())
    assert {c.kernel_size for c in convs} == {(7, 7), (3, 3), (1, 1)}
    assert [c.kernel_size for c in convs].count((7, 7)) == 1


def test_bn_inception_shapes_at_224():
    model = models.create_model("bn_inception", num_classes=10).eval()
    shapes = {}
    for name in ("maxpool2", "inception3b", "inception3c", "inception4d", "inception4e", "inception5b"):
        getattr(model, name).register_forward_hook(lambda m, a, out, n=name: shapes.__setitem__(n, tuple(out.shape)))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert shapes == {"maxpool2": (1, 192, 28, 28), "inception3b": (1, 320, 28, 28), "inception3c": (1, 576, 14, 14),
                      "inception4d": (1, 608, 14, 14), "inception4e": (1, 1056, 7, 7), "inception5b": (1, 1024, 7, 7)}
    assert logits.shape == (1, 10)


def test_bn_inception_forward_backward_smoke():
    torch.manual_seed(0)
    model = models.create_model("bn_inception", num_classes=10).train()
    for size in (33, 64):  # odd sizes too: the stride-2 modules' branches must agree
        loss = F.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([2, 9]))
        loss.backward()
        assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert int(model.conv1.bn.num_batches_tracked) == 2
