"""SE-ResNet / SE-ResNeXt in plain torch, the bench's baseline for cnnkernels.models'
se_resnet* and se_resnext*: torchvision's ResNet and Bottleneck with timm's SEModule
(fc1, fc2 1x1 convolutions with bias) applied to bn3's output before the residual add,
the same keys and shapes as ours, so our state_dict loads with strict=True. Plain
modules throughout, so torch.compile sees through it and OpenVINO converts it."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet


class SEModule(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))), x [N, C, H, W]; fc1 C -> R, fc2 R -> C."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class SEBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with an SEModule on bn3's output (timm's SE-ResNet order)."""

    def __init__(self, *args, rd_channels: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.se = SEModule(self.conv3.out_channels, rd_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def like(ours: nn.Module) -> tv_resnet.ResNet:
    """A plain SE-ResNet(Xt) with the structure of our model `ours` (a cnnkernels.models
    ResNet whose bottlenecks have SE gates): same depth per stage, groups, width, SE widths
    and classifier; its own fresh weights (the bench loads ours into it)."""
    stages = [ours.layer1, ours.layer2, ours.layer3, ours.layer4]
    widths = iter([block.se.fc1.out_channels for stage in stages for block in stage])

    def block(*args, **kwargs):
        return SEBottleneck(*args, rd_channels=next(widths), **kwargs)
    block.expansion = tv_resnet.Bottleneck.expansion
    return tv_resnet.ResNet(block, [len(stage) for stage in stages], num_classes=ours.fc.out_features,
                            groups=ours.groups, width_per_group=ours.base_width)
