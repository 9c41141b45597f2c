"""On a CUDA device: whole fused models against torchvision's with the same weights on the
same GPU, float32 with TF32 off: eval outputs, and one train-mode forward + backward
(outputs, every parameter's gradient, running statistics), with the fused ops on each GPU
backend (counted: none may fall back to the reference backend). Skipped where no GPU is
present.

Bounds: eval 1e-4 (as the CPU parity tests); train mode to the sanity bounds of
tests/models/test_resnet_family.py (outputs 0.1, all gradients together 0.3, running
statistics 2e-2), since deep float32 networks in train mode on small inputs are
ill-conditioned (BN over a few values per channel deep in the net) and torchvision's own
float32 gradients differ from its float64 ones by up to 1.2e-1 there."""
from __future__ import annotations

import pytest
import torch
import torchvision

import cnnkernels
from cnnkernels import models
from cnnkernels.bench.harness import recording_backends
from helpers import half_precision_bound, randomize_batchnorm, rel_err

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TWINS = [("resnet50", "resnet50"), ("resnext50_32x4d", "resnext50_32x4d"), ("densenet121", "densenet121")]


def _twins(name: str, twin: str, channels_last: bool):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, twin)(num_classes=10)
    randomize_batchnorm(tv)
    ours = models.create_model(name, num_classes=10)
    ours.load_state_dict(tv.state_dict(), strict=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tv.to(DEVICE).to(memory_format=fmt), ours.to(DEVICE).to(memory_format=fmt), fmt


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name, twin", TWINS, ids=[t[0] for t in TWINS])
def test_eval_matches_torchvision(name, twin, backend, channels_last):
    tv, ours, fmt = _twins(name, twin, channels_last)
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=fmt)
    with torch.no_grad():
        expected = tv.eval()(x)
        with cnnkernels.use_backend(backend), recording_backends() as used:
            got = ours.eval()(x)
    assert used and all(set(counts) == {backend} for counts in used.values()), used
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name, twin", TWINS, ids=[t[0] for t in TWINS])
def test_train_step_matches_torchvision(name, twin, backend):
    tv, ours, fmt = _twins(name, twin, True)
    x = torch.randn(4, 3, 64, 64, device=DEVICE).contiguous(memory_format=fmt)
    expected = tv.train()(x)
    expected.square().mean().backward()
    with cnnkernels.use_backend(backend), recording_backends() as used:
        got = ours.train()(x)
        got.square().mean().backward()
    assert used and all(set(counts) == {backend} for counts in used.values()), used
    assert rel_err(got, expected) < 0.1
    tv_params, our_params = dict(tv.named_parameters()), dict(ours.named_parameters())
    grads = torch.cat([our_params[k].grad.flatten() for k in tv_params])
    tv_grads = torch.cat([p.grad.flatten() for p in tv_params.values()])
    assert rel_err(grads, tv_grads) < 0.3
    tv_state = tv.state_dict()
    for key, value in ours.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert rel_err(value, tv_state[key]) < 2e-2, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name, twin", TWINS, ids=[t[0] for t in TWINS])
def test_autocast_matches_torchvision(name, twin, backend, dtype):
    """Under torch.autocast("cuda", dtype): eval logits as close to float32 as torchvision's
    under the same autocast (2x its error, floor 1e-2), and a training step with a
    GradScaler gives finite float32 gradients."""
    tv, ours, fmt = _twins(name, twin, True)
    x = torch.randn(4, 3, 64, 64, device=DEVICE).contiguous(memory_format=fmt)
    with torch.no_grad():
        full = tv.eval()(x)
        with torch.autocast("cuda", dtype=dtype):
            theirs = tv(x)
            with cnnkernels.use_backend(backend):
                got = ours.eval()(x)
    assert got.dtype == dtype
    assert rel_err(got, full) < half_precision_bound(rel_err(theirs, full), dtype)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=dtype), cnnkernels.use_backend(backend):
        loss = ours.train()(x).float().square().mean()
    scaler.scale(loss).backward()
    for key, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), key
