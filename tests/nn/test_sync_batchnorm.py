"""cnnkernels.nn.convert_sync_batchnorm: two processes on gloo (tests/nn/sync_bn_worker.py)
train and run the fused models with synchronised BatchNorm; every figure, in float64,
must match one process running the whole batch (our fused models, and torchvision's)."""
import pytest
import torch
from torch import nn

import cnnkernels
from cnnkernels import models
from helpers import skip_or_fail
from sync_bn_ranks import CHECKS, assert_checks_pass, run_ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not torch.distributed.is_available():
        skip_or_fail("torch.distributed is not available in this build (needed for the gloo processes)")
    return run_ranks(tmp_path_factory.mktemp("sync_bn"))


@pytest.mark.parametrize("check", CHECKS)
def test_two_ranks_match_one_process_on_the_whole_batch(two_ranks, check):
    assert_checks_pass(two_ranks, check)


def test_convert_replaces_every_batch_norm_and_keeps_the_state():
    torch.manual_seed(0)
    model = models.densenet.DenseNet(8, (2, 2), 16, num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: p for k, p in model.named_parameters()}
    converted = cnnkernels.nn.convert_sync_batchnorm(model, process_group=None)
    assert not any(type(m) in (nn.BatchNorm2d, nn.BatchNorm1d) for m in converted.modules())
    syncs = [m for m in converted.modules() if isinstance(m, cnnkernels.nn.SyncBatchNorm)]
    assert len(syncs) == sum(1 for k in state if k.endswith("running_var"))
    assert converted.state_dict().keys() == state.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in state.items())
    assert all(p is params[k] for k, p in converted.named_parameters())  # shared, as torch's convert does
    bn = nn.BatchNorm2d(4)
    root = cnnkernels.nn.convert_sync_batchnorm(bn)
    assert isinstance(root, cnnkernels.nn.SyncBatchNorm) and root.weight is bn.weight


def test_one_process_runs_the_fused_ops_as_before():
    """Without torch.distributed initialised a converted model computes what it did."""
    torch.manual_seed(0)
    model = models.resnet18(num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    converted = cnnkernels.nn.convert_sync_batchnorm(models.resnet18(num_classes=3))
    converted.load_state_dict(model.state_dict())
    torch.testing.assert_close(converted(x), reference, rtol=1e-5, atol=1e-5)
