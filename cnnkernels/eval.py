"""Test-time evaluation helpers of the classic papers: multi-crop testing and ensembles.

    probs = multi_crop(model, images, crops=10)            # AlexNet / VGG 10-crop
    probs = multi_crop(model, images, crops=144)           # GoogLeNet's 144 crops
    probs = multi_crop(ensemble([net_a, net_b]), images)    # both at once

10 crops: the shorter side is resized to `resize` (256), then the four corner and the
center crop_size (224) squares, and the same five of the horizontally mirrored image.
144 crops (Szegedy et al. 2014, section 7): the shorter side resized to each of 256, 288,
320, 352; from each, three squares of that side (left, center, right for landscape
images; top, center, bottom for portrait ones); from each square the four corner and the
center 224 crops plus the whole square resized to 224; each of those mirrored too:
4 x 3 x 6 x 2 = 144. The softmax outputs of all crops are averaged.
Resizing is bilinear with antialiasing (torchvision's Resize on tensors); images are
float tensors [N, 3, H, W], already normalised the way the model expects.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Ensemble", "ensemble", "googlenet_crops", "multi_crop", "resize_shorter_side", "ten_crops"]

GOOGLENET_SCALES = (256, 288, 320, 352)


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H', W'] with min(H', W') = size and the aspect ratio kept
    (the longer side is int(size * long / short), as torchvision's Resize(size))."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)


def _five(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Top-left, top-right, bottom-left, bottom-right and center size x size crops."""
    h, w = images.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the image {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [images[..., :size, :size], images[..., :size, w - size:], images[..., h - size:, :size],
            images[..., h - size:, w - size:], images[..., top:top + size, left:left + size]]


def ten_crops(images: torch.Tensor, crop_size: int = 224, resize: Optional[int] = 256) -> Iterator[torch.Tensor]:
    """The 10 views [N, C, crop_size, crop_size] of a batch: the 4 corner and the center
    crops after resizing the shorter side to `resize` (None: no resizing), then the same
    5 crops of the mirrored image."""
    if resize is not None:
        images = resize_shorter_side(images, resize)
    crops = _five(images, crop_size)
    yield from crops
    yield from _five(images.flip(-1), crop_size)


def googlenet_crops(images: torch.Tensor, crop_size: int = 224,
                    scales: Sequence[int] = GOOGLENET_SCALES) -> Iterator[torch.Tensor]:
    """GoogLeNet's len(scales) x 3 x 6 x 2 views [N, C, crop_size, crop_size]: per scale
    (shorter side), three squares along the longer side (start, center, end), per square
    the 5 crops of `ten_crops` plus the square resized to crop_size, each also mirrored."""
    for scale in scales:
        resized = resize_shorter_side(images, scale)
        h, w = resized.shape[-2:]
        side = min(h, w)
        slack = max(h, w) - side
        for offset in (0, int(round(slack / 2.0)), slack):
            square = (resized[..., :, offset:offset + side] if w >= h
                      else resized[..., offset:offset + side, :])
            views = _five(square, crop_size)
            views.append(F.interpolate(square, size=(crop_size, crop_size), mode="bilinear",
                                       align_corners=False, antialias=True))
            for view in views:
                yield view
                yield view.flip(-1)


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def multi_crop(model: nn.Module, images: torch.Tensor, crops: int = 10, crop_size: int = 224,
               resize: Optional[int] = 256, scales: Sequence[int] = GOOGLENET_SCALES) -> torch.Tensor:
    """Multi-crop testing: the mean over crops of softmax(model(crop)), [N, num_classes].

    images [N, C, H, W]. crops=10: `ten_crops(images, crop_size, resize)`; crops=144:
    `googlenet_crops(images, crop_size, scales)` (144 with the default 4 scales). The
    model runs in eval mode without gradients (its training flag is restored after);
    a tuple output (aux heads) contributes its first element.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        described = (f"a {images.dim()}-D {images.dtype} tensor" if isinstance(images, torch.Tensor)
                     else type(images).__name__)
        raise ValueError(f"images must be a floating [N, C, H, W] tensor, got {described}")
    if crops == 10:
        views = ten_crops(images, crop_size, resize)
    elif crops == 144:
        views = googlenet_crops(images, crop_size, scales)
    else:
        raise ValueError(f"crops must be 10 or 144, got {crops!r}")
    was_training = model.training
    model.eval()
    try:
        total, count = None, 0
        for view in views:
            probs = torch.softmax(_logits(model(view.contiguous())).float(), dim=1)
            total = probs if total is None else total + probs
            count += 1
    finally:
        model.train(was_training)
    return total / count


class Ensemble(nn.Module):
    """Averaged predictions of several models.

    forward(x) -> log(sum_i w_i softmax(model_i(x))) [N, num_classes], the log of the
    (weighted) mean class probabilities: argmax is the ensemble's prediction, .exp()
    the probabilities, and softmax of it gives the mean probabilities back, so an
    Ensemble can go wherever a classifier's logits are expected (multi_crop, for one).
    A tuple output (aux heads) contributes its first element.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("an ensemble needs at least one model")
        if weights is None:
            weights = [1.0] * len(models)
        if len(weights) != len(models) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights}")
        self.members = nn.ModuleList(models)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = None
        for weight, model in zip(self.weights, self.members):
            probs = weight * torch.softmax(_logits(model(x)).float(), dim=1)
            mean = probs if mean is None else mean + probs
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


def ensemble(models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None) -> Ensemble:
    """An Ensemble of `models` (optionally weighted): its output is the log of the averaged
    softmax probabilities, [N, num_classes]."""
    return Ensemble(models, weights)
