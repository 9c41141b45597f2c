"""ConvBNAct: nn.Conv2d + nn.BatchNorm2d + activation, run as one fused op."""
from __future__ import annotations

import torch
from torch import nn

from cnnkernels.nn.functional import assemble, check_pair, conv_bn_act_modules


class ConvBNAct(nn.Module):
    """Conv2d -> BatchNorm2d -> (+ residual) -> activation ("relu" or "none"), fused.

    Holds `conv` (nn.Conv2d) and `bn` (nn.BatchNorm2d), so its state_dict keys are
    those of the unfused pair (conv.weight, bn.weight, bn.running_mean, ...), and
    behaves like them in train and eval mode, running statistics and
    num_batches_tracked included. forward(x [N, C_in, H, W], residual=None)
    returns [N, C_out, H_out, W_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 groups: int = 1, activation: str = "relu", dilation=1, bias: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=bias, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str = "relu") -> "ConvBNAct":
        """Wraps existing modules (shared, not copied)."""
        check_pair(conv, bn, "output")
        return assemble(cls, {"conv": conv, "bn": bn}, {"activation": activation})

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bn_act_modules(self.conv, self.bn, x, residual, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
