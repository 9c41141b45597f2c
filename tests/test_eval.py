"""cnnkernels.eval: 10-crop and GoogLeNet 144-crop testing, ensembles."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from cnnkernels.eval import Ensemble, ensemble, googlenet_crops, multi_crop, resize_shorter_side, ten_crops
from helpers import rel_err


def tiny_classifier(seed: int, classes: int = 5) -> nn.Module:
    """A small position-sensitive classifier (its output changes with the crop)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(classes))


def images(h: int, w: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


def test_resize_shorter_side_matches_torchvision():
    for h, w in ((300, 400), (400, 300), (256, 256)):
        x = images(h, w)
        out, ref = resize_shorter_side(x, 256), TF.resize(x, 256, antialias=True)
        assert out.shape == ref.shape and min(out.shape[-2:]) == 256
        assert rel_err(out, ref) < 1e-5


def test_ten_crops_match_torchvision():
    x = images(300, 400)
    views = list(ten_crops(x, 224, 256))
    ref = TF.ten_crop(TF.resize(x, 256, antialias=True), [224, 224])
    assert len(views) == 10
    for view, expected in zip(views, ref):
        assert view.shape == (2, 3, 224, 224)
        assert rel_err(view, expected) < 1e-5


@pytest.mark.parametrize("h,w", [(300, 400), (400, 300)])
def test_googlenet_crops(h, w):
    x = images(h, w)
    views = list(googlenet_crops(x))
    assert len(views) == 144 and all(v.shape == (2, 3, 224, 224) for v in views)
    # scale 256, first square (left or top), its top-left crop, then its mirror
    resized = resize_shorter_side(x, 256)
    assert min(resized.shape[-2:]) == 256
    first_square = resized[..., :256, :256]
    assert torch.equal(views[0], first_square[..., :224, :224])
    assert torch.equal(views[1], first_square[..., :224, :224].flip(-1))
    # the sixth of each square is the whole square resized to 224 (then its mirror)
    expected = nn.functional.interpolate(first_square, size=(224, 224), mode="bilinear", align_corners=False,
                                         antialias=True)
    assert torch.equal(views[10], expected) and torch.equal(views[11], expected.flip(-1))
    # last square of the first scale: right (landscape) or bottom (portrait) end
    last_square = resized[..., -256:, -256:]
    assert torch.equal(views[24], last_square[..., :224, :224])
    # last scale, last square, resized and mirrored
    largest = resize_shorter_side(x, 352)
    assert min(largest.shape[-2:]) == 352
    tail = nn.functional.interpolate(largest[..., -352:, -352:], size=(224, 224), mode="bilinear",
                                     align_corners=False, antialias=True).flip(-1)
    assert torch.equal(views[-1], tail)


def test_multi_crop_averages_softmax_over_the_views():
    model = tiny_classifier(0)
    x = images(260, 300)
    model(x[:, :, :224, :224])  # materialise the lazy layer
    model.train()
    for crops, views in ((10, ten_crops(x)), (144, googlenet_crops(x))):
        with torch.no_grad():
            expected = torch.stack([torch.softmax(model.eval()(v), 1) for v in views]).mean(0)
        model.train()
        probs = multi_crop(model, x, crops=crops)
        assert probs.shape == (2, 5) and rel_err(probs, expected) < 1e-6
        assert torch.allclose(probs.sum(1), torch.ones(2))
        assert model.training  # the training flag is restored
    with pytest.raises(ValueError, match="crops must be 10 or 144"):
        multi_crop(model, x, crops=12)


def test_ensemble_averages_probabilities():
    members = [tiny_classifier(seed) for seed in (1, 2, 3)]
    x = images(224, 224)
    for m in members:
        m(x)
    net = ensemble(members)
    assert isinstance(net, Ensemble) and len(net.members) == 3
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        out = net(x)
        assert rel_err(out.exp(), mean) < 1e-6
        assert rel_err(torch.softmax(out, 1), mean) < 1e-6
        assert torch.equal(out.argmax(1), mean.argmax(1))
        weighted = ensemble(members, weights=[2, 1, 1])(x).exp()
        expected = (2 * torch.softmax(members[0](x), 1) + torch.softmax(members[1](x), 1)
                    + torch.softmax(members[2](x), 1)) / 4
        assert rel_err(weighted, expected) < 1e-6
    with pytest.raises(ValueError):
        ensemble([])
    with pytest.raises(ValueError):
        ensemble(members, weights=[1, 1])


def test_multi_crop_of_an_ensemble_is_the_mean_of_the_members_multi_crops():
    members = [tiny_classifier(seed) for seed in (4, 5)]
    x = images(256, 288)
    for m in members:
        m(x[:, :, :224, :224])
    combined = multi_crop(ensemble(members), x, crops=10)
    separate = (multi_crop(members[0], x, crops=10) + multi_crop(members[1], x, crops=10)) / 2
    assert rel_err(combined, separate) < 1e-5


def test_multi_crop_takes_the_main_output_of_aux_models():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_classifier(6)

        def forward(self, x):
            logits = self.net(x)
            return (logits, logits * 0) if self.training else logits

    model = WithAux()
    x = images(256, 256, n=1)
    model.net(x[:, :, :224, :224])
    ensemble_out = Ensemble([model.train()])(x[:, :, :224, :224])
    assert ensemble_out.shape == (1, 5)
    assert multi_crop(model, x).shape == (1, 5)
