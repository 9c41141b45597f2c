"""torch.compile(fullgraph=True) over one model of each of the ten families: no graph
break, the fused ops captured; eval through Inductor and a training step through
aot_eager (Inductor compiles of every model would not fit the test budget), both against
the eager model."""
from __future__ import annotations

import pytest
import torch

from cnnkernels import models

# family: (model, input size, builder arguments); dropout off so that the compiled and the
# eager training step draw no masks
FAMILIES = {
    "AlexNet": ("alexnet", 64, {"dropout": 0.0}),
    "ZFNet": ("zfnet", 64, {"dropout": 0.0}),
    "VGG": ("vgg11_bn", 32, {"dropout": 0.0}),
    "GoogLeNet": ("googlenet", 64, {"aux_logits": False, "dropout": 0.0}),
    "Inception": ("inception_v3", 75, {"aux_logits": False, "dropout": 0.0}),
    "ResNet": ("resnet18", 32, {}),
    "pre-activation ResNet": ("preact_resnet18", 32, {}),
    "ResNeXt": ("resnext50_32x4d", 32, {}),
    "SENet": ("se_resnet50", 32, {}),
    "DenseNet": ("densenet121", 32, {}),
}


def _model(family, seed=0):
    name, size, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = models.create_model(name, num_classes=5, **kwargs)
    for m in model.modules():  # non-trivial running statistics, so eval differs from train
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, size, size)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inductor_eval_fullgraph(family):
    torch._dynamo.reset()
    model, x = _model(family)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_aot_eager_training_step_fullgraph(family):
    torch._dynamo.reset()
    model, x = _model(family)
    twin, _ = _model(family)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    twin(x).square().mean().backward()
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")
    for (key, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
