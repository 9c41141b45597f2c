"""Every registered architecture under torch.autocast("cpu", torch.bfloat16), as a user runs
torchvision's: eval forward and a training step work, and the fused ops follow autocast
(their convolutions run in bfloat16, BatchNorm statistics stay float32). The eval output
must be as close to the float32 output as torch's own ops get under autocast: within
twice the error of the same model with every fused op on the "reference" backend (plain
torch ops under autocast), floor 2e-2 (tests/helpers.half_precision_bound)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cnnkernels
from cnnkernels import models
from cnnkernels.bench.harness import logits_of, recording_backends
from helpers import half_precision_bound, randomize_batchnorm, rel_err

# One name per architecture (aliases share a builder).
_BUILDERS = {}
for _name in models.list_models():
    _BUILDERS.setdefault(getattr(models, _name), _name)
ARCHITECTURES = sorted(_BUILDERS.values())
SIZE = {"inception_v3": 299}  # its auxiliary head (train mode) needs 17x17 maps at Mixed_6e


class FusedInputDtypes(TorchDispatchMode):
    """The dtype of x (or of out, for the into form) of every fused cnnkernels op call."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cnnkernels" and not func._schema.name.endswith("_backward"):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _model_and_input(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=5)
    randomize_batchnorm(model)
    size = SIZE.get(name, 64)
    return model, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_eval_under_bfloat16_autocast(name):
    model, x = _model_and_input(name)
    model.eval()
    with torch.no_grad():
        full = logits_of(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with cnnkernels.use_backend("reference"):
                plain = logits_of(model(x))
            with recording_backends() as used, FusedInputDtypes() as fused:
                ours = logits_of(model(x))
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert fused.dtypes <= {torch.bfloat16}, fused.dtypes  # the fused ops (if any) ran in autocast's dtype
    bound = half_precision_bound(rel_err(plain, full), torch.bfloat16, floor=2e-2)
    assert rel_err(ours, full) < bound, (rel_err(ours, full), rel_err(plain, full))
    assert all(set(counts) <= {"cpu"} for counts in used.values()), used


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_training_step_under_bfloat16_autocast(name):
    model, x = _model_and_input(name)
    model.train()
    running = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    with torch.autocast("cpu", dtype=torch.bfloat16), FusedInputDtypes() as fused:
        out = model(x)
        loss = sum(logits.float().square().mean() for logits in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    assert fused.dtypes <= {torch.bfloat16}, fused.dtypes
    for key, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), key
    for key, value in model.state_dict().items():
        if key in running:
            assert value.dtype == torch.float32 and not torch.equal(value, running[key]), key
