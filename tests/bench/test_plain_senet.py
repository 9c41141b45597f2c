"""The bench's plain-torch SE-ResNet/SE-ResNeXt baseline (cnnkernels/bench/plain_senet.py):
our weights load into it strict, and it computes what our fused model computes."""
import pytest
import torch

from cnnkernels import models
from cnnkernels.bench import architectures
from helpers import randomize_batchnorm, rel_err


@pytest.mark.parametrize("name", ["se_resnet50", "se_resnext50", "se_resnext101_32x4d"])
def test_plain_twin_loads_our_weights_strict_and_matches_in_float64(name):
    torch.manual_seed(0)
    ours = models.create_model(name, num_classes=10).eval()
    randomize_batchnorm(ours)
    arch = architectures.architecture(name)
    twin = arch.build_baseline(ours.state_dict(), 10).eval()
    twin.load_state_dict(ours.state_dict(), strict=True)
    assert arch.baseline_backend is None
    assert not any(type(m).__module__.startswith("cnnkernels.nn") for m in twin.modules())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours.double()(x), twin.double()(x)) < 1e-12
