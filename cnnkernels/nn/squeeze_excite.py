"""SqueezeExcite: the Squeeze-and-Excitation channel gate (Hu et al. 2018), with timm's
SEModule parameter names (fc1, fc2), optionally followed by the residual add and the
activation of the block it ends (SE-ResNet: relu(se(bn3(conv3(x))) + identity))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels.ops.se_excite import se_excite
from cnnkernels.nn.functional import assemble

ACTIVATIONS = ("relu", "none")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """`value` rounded to the nearest multiple of `divisor` (at least `min_value`, default
    `divisor`), bumped up one step when the rounding lost more than 1 - round_limit of it:
    timm's make_divisible. SqueezeExcite uses round_limit=0 (never bumped), as timm's
    SEModule does: make_divisible(256 / 16, 8, round_limit=0) = 16, (64 / 16) -> 8."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def squeeze_excite(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                   fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                   residual: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
    """act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + residual), in plain torch.

    Shapes: x [N, C, H, W]; fc1_weight [R, C] or [R, C, 1, 1] (a 1x1 conv's weight),
    fc1_bias [R]; fc2_weight [C, R] or [C, R, 1, 1], fc2_bias [C]; residual [N, C, H, W]
    or None. Returns [N, C, H, W] in x's memory format. activation is "relu" or "none".
    This is the single call SqueezeExcite.forward makes: a fused op with the same
    arguments replaces it without touching the module.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    squeezed = x.mean(dim=(2, 3))                                              # [N, C]
    hidden = F.relu(F.linear(squeezed, fc1_weight.flatten(1), fc1_bias))       # [N, R]
    gate = torch.sigmoid(F.linear(hidden, fc2_weight.flatten(1), fc2_bias))    # [N, C]
    out = x * gate[:, :, None, None]
    if residual is not None:
        out = out + residual
    return F.relu(out) if activation == "relu" else out


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation gate with timm's SEModule keys: fc1 = Conv2d(C, R, 1, bias=True),
    fc2 = Conv2d(R, C, 1, bias=True), R = make_divisible(C / reduction, rd_divisor,
    round_limit=0) (timm's rule) unless rd_channels is given.
    The forward runs the fused op cnnkernels.ops.se_excite (same semantics as
    squeeze_excite() above, which stays as the plain-torch spelling).

    forward(x [N, C, H, W], residual=None, activation="none") returns
    act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + residual), [N, C, H, W]; with the
    defaults it is exactly timm's SEModule. activation is "relu" or "none".
    """

    def __init__(self, channels: int, reduction: float = 16, rd_divisor: int = 8, rd_channels: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if rd_channels is None:
            rd_channels = make_divisible(channels / reduction, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True, device=device, dtype=dtype)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True, device=device, dtype=dtype)

    @classmethod
    def from_modules(cls, fc1: nn.Conv2d, fc2: nn.Conv2d) -> "SqueezeExcite":
        """Wraps existing 1x1 convolutions (shared, not copied), e.g. those of timm's SEModule."""
        for name, conv in (("fc1", fc1), ("fc2", fc2)):
            if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1
                    or conv.padding != (0, 0) or conv.padding_mode != "zeros"):
                raise ValueError(f"{name} must be a 1x1 nn.Conv2d with groups=1 and no padding, got {conv!r}")
        if fc1.out_channels != fc2.in_channels or fc2.out_channels != fc1.in_channels:
            raise ValueError(f"fc1 {fc1.in_channels}->{fc1.out_channels} and fc2 {fc2.in_channels}->"
                             f"{fc2.out_channels} do not form a C->R->C gate")
        return assemble(cls, {"fc1": fc1, "fc2": fc2})

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
        return se_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=residual,
                         activation=activation)
