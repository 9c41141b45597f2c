"""A tiny architecture for testing the benchmark harness: ours runs cnnkernels'
ConvBNAct (the fused op), the baseline is the same network in plain torch modules with
the same state_dict keys, so the harness's strict weight loading and output
comparison are exercised as with a real zoo model."""
import pytest
import torch
from torch import nn

from cnnkernels.bench import architectures
from cnnkernels.nn import ConvBNAct


class TinyNet(nn.Module):
    """Ours: conv-bn-relu stem, a residual conv-bn-relu block, global pool, linear.
    [N, 3, H, W] -> [N, num_classes]."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, padding=1)
        self.block = ConvBNAct(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.block(x, residual=x)
        return self.fc(x.mean((2, 3)))


class _PlainConvBNReLU(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        return torch.relu(y if residual is None else y + residual)


class TinyTwin(TinyNet):
    """The baseline: TinyNet in plain torch modules, same keys."""

    def __init__(self, num_classes: int = 1000):
        nn.Module.__init__(self)
        self.stem = _PlainConvBNReLU(3, 8)
        self.block = _PlainConvBNReLU(8, 8)
        self.fc = nn.Linear(8, num_classes)


TINY = architectures.Architecture(
    "tiny", "TinyTwin (plain torch)", lambda state, num_classes: TinyTwin(num_classes),
    build_ours=lambda num_classes: TinyNet(num_classes))


@pytest.fixture(scope="session")
def tiny():
    """Registers the tiny architecture (name "tiny") for the session, and removes it
    afterwards."""
    architectures.register(TINY)
    yield TINY
    architectures.TABLE.pop("tiny", None)
