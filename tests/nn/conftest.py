import pytest
import torch

from cnnkernels.nn import frozen_cpu


@pytest.fixture(params=["native", "emulated"])
def bf16_compute(request, monkeypatch):
    """The frozen CPU path's bfloat16 work both ways; the dtype its convolutions run in.
    native: oneDNN's bfloat16 convolutions (skipped on a CPU without them, where the
    emulated case is what runs); emulated: float32 convolutions with results rounded to
    bfloat16, what a CPU without them (AVX2 only) runs, forced here on any CPU."""
    if request.param == "native":
        if not frozen_cpu._support()[1]:
            pytest.skip("oneDNN has no bfloat16 convolutions on this CPU: the emulated case covers it")
        return torch.bfloat16
    monkeypatch.setattr(frozen_cpu, "_USABLE", (frozen_cpu._support()[0], False))
    return torch.float32
