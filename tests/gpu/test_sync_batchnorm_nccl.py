"""cnnkernels.nn.convert_sync_batchnorm on nccl: two ranks, one GPU each
(tests/nn/sync_bn_worker.py), float64: every check of the gloo test
(tests/nn/test_sync_batchnorm.py), and ours against torchvision's ResNet-18 converted by
torch.nn.SyncBatchNorm (which runs on GPUs only) under DDP on the same local batches.
Needs two CUDA devices and nccl; skipped elsewhere."""
import pytest
import torch

from sync_bn_ranks import CHECKS, assert_checks_pass, run_ranks

pytestmark = pytest.mark.gpu

NCCL_CHECKS = [f"resnet18 vs torch.nn.SyncBatchNorm: {what}" for what in ("outputs", "gradients",
                                                                          "running statistics")]


@pytest.fixture(scope="module")
def two_gpu_ranks(tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count()}")
    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        pytest.skip("this torch build has no nccl")
    return run_ranks(tmp_path_factory.mktemp("sync_bn_nccl"), backend="nccl")


@pytest.mark.parametrize("check", CHECKS + NCCL_CHECKS)
def test_two_gpus_match_one_process_and_torch_sync_batchnorm(two_gpu_ranks, check):
    assert_checks_pass(two_gpu_ranks, check)
