"""BNActConv: nn.BatchNorm2d + activation + nn.Conv2d (pre-activation order), run as one fused op."""
from __future__ import annotations

import torch
from torch import nn

from cnnkernels.nn.functional import assemble, bn_act_conv_modules, check_pair


class BNActConv(nn.Module):
    """BatchNorm2d(in_channels) -> activation ("relu" or "none") -> Conv2d, fused, as in
    DenseNet layers and pre-activation ResNet blocks.

    Holds `bn` (nn.BatchNorm2d) and `conv` (nn.Conv2d), so its state_dict keys are those
    of the unfused pair (bn.weight, bn.running_mean, conv.weight, ...), and behaves like
    them in train and eval mode: running statistics, num_batches_tracked, momentum=None
    (cumulative average) and track_running_stats=False included.

    forward(x [N, in_channels, H, W], out=None) returns [N, out_channels, H_out, W_out].
    x may be a channel-prefix view of a wider buffer (read in place). With out= (a
    tensor of the output's shape, e.g. a channel slice of a DenseNet feature buffer) the
    result is written into it and it is returned; that form records no autograd (see
    cnnkernels.ops.bn_act_conv).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, activation: str = "relu", eps: float = 1e-5,
                 momentum: float | None = 0.1, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, activation: str = "relu") -> "BNActConv":
        """Wraps existing modules (shared, not copied)."""
        check_pair(conv, bn, "input")
        return assemble(cls, {"bn": bn, "conv": conv}, {"activation": activation})

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return bn_act_conv_modules(self.bn, self.conv, x, self.activation, out)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
