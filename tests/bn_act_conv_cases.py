"""The bn_act_conv case list shared by its tests: layer shapes, and x layouts including
channel-prefix views of wider NCHW and channels_last buffers (DenseNet's concat buffer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers import ConvShape, seeded_randn

LAYOUTS = ("contiguous", "channels_last", "prefix", "prefix_cl")
GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias")
EPS = 1e-5


@dataclass(frozen=True)
class BnCase(ConvShape):
    """One bn_act_conv configuration. layout: how x is laid out in memory; "prefix" and
    "prefix_cl" make x the view buf[:, :c_in] of a buffer with `extra` more channels."""
    c_out: int = 8
    hw: int = 6
    layout: str = "contiguous"
    activation: str = "relu"
    bias: bool = False
    affine: bool = True
    extra: int = 5

    @property
    def channels_last_out(self) -> bool:
        return self.layout in ("channels_last", "prefix_cl")

    def make(self, dtype=torch.float32, requires_grad=True, seed=0):
        """Fresh random inputs: x, weight, bias, bn_weight, bn_bias, running_mean, running_var."""
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0, offset=0.0):
            return seeded_randn(gen, *shape, scale=scale, offset=offset, dtype=torch.float64)

        x = make_x(rand(self.n, self.c_in, self.hw, self.hw, scale=1.5, offset=0.3).to(dtype), self.layout,
                   self.extra, gen)
        weight = self.conv_weight(gen, dtype)
        bias = rand(self.c_out, scale=0.1).to(dtype) if self.bias else None
        bn_weight = rand(self.c_in, scale=0.3, offset=1.0).to(dtype) if self.affine else None
        bn_bias = rand(self.c_in, scale=0.3).to(dtype) if self.affine else None
        running_mean = rand(self.c_in, scale=0.2, offset=0.3).to(dtype)
        running_var = (rand(self.c_in, scale=0.3).abs() + 1.5).to(dtype)
        if requires_grad:
            for t in (x, weight, bias, bn_weight, bn_bias):
                if t is not None:
                    t.requires_grad_(True)
        return x, weight, bias, bn_weight, bn_bias, running_mean, running_var

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    activation=self.activation)


def make_x(values: torch.Tensor, layout: str, extra: int = 5, gen=None) -> torch.Tensor:
    """values [N, C, H, W] laid out as `layout`; prefix layouts are buf[:, :C] views of a
    buffer with `extra` more channels of other random values (a detached leaf view)."""
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    n, c, h, w = values.shape
    fmt = torch.channels_last if layout == "prefix_cl" else torch.contiguous_format
    buf = torch.empty(n, c + extra, h, w, dtype=values.dtype).contiguous(memory_format=fmt)
    buf[:, c:] = torch.randn(n, extra, h, w, generator=gen, dtype=torch.float64).to(values.dtype)
    buf[:, :c] = values
    return buf[:, :c].detach()


CASES = [
    BnCase("1x1", kernel=1, padding=0, c_out=12),
    BnCase("3x3"),
    BnCase("stem7x7s2", c_in=3, c_out=8, hw=10, kernel=7, stride=2, padding=3),
    BnCase("3x3s2_bias", stride=2, bias=True),
    BnCase("dilation2_none", padding=2, dilation=2, activation="none"),
    BnCase("groups2", groups=2, c_out=6),
    BnCase("groups32", c_in=64, c_out=64, hw=4, groups=32),
    BnCase("depthwise", c_in=16, c_out=16, groups=16),
    BnCase("channels_last", layout="channels_last"),
    BnCase("batch1", n=1, hw=5),
    BnCase("odd_channels", c_in=3, c_out=5, hw=7, bias=True, activation="none"),
    BnCase("1x1s2_channels_last", kernel=1, padding=0, stride=2, layout="channels_last"),
    BnCase("prefix_nchw", layout="prefix"),
    BnCase("prefix_cl_1x1", layout="prefix_cl", kernel=1, padding=0, c_out=16),
    BnCase("prefix_cl_3x3", layout="prefix_cl", c_in=5, c_out=4),
    BnCase("prefix_nchw_groups_none", layout="prefix", groups=2, activation="none", affine=False),
    BnCase("dense_32_columns", layout="prefix_cl", c_in=20, c_out=24, hw=4, n=1),
    BnCase("dense_64_columns", layout="prefix_cl", c_in=20, c_out=40, hw=4, n=1, kernel=1, padding=0),
]
