"""DenseNet-121/161/169/201: parity with torchvision (keys, parameter counts, eval and train
outputs, gradients, running statistics; dropout and recomputation variants), dense blocks
as cnnkernels.nn.DenseBlock, every BN-ReLU-conv (dense layers and transitions) one fused
bn_act_conv op, and torch.compile(fullgraph=True) without a graph break."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cnnkernels import models
from cnnkernels.nn import DenseBlock, FusedSequential
from helpers import RecordOps, assert_same_gradients, load_twin_state, rel_err, train_forward_alike


def assert_parity(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    """torchvision's state_dict loads strictly; eval outputs agree in float32 (< 1e-4); in
    float64 (training-mode BatchNorm over small batches is ill-conditioned in float32),
    train outputs (same dropout masks), the input's and every parameter's gradients and
    the running statistics agree (< 1e-6)."""
    load_twin_state(ours, theirs)

    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-4

    out, ref, x_ours, x_theirs = train_forward_alike(ours, theirs, x)
    assert rel_err(out, ref) < 1e-6
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same_gradients(ours, theirs, out, ref, [(x_ours, x_theirs)], 1e-6, grad_out)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        assert rel_err(b.double(), c.double()) < 1e-6, name


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_densenet_parity(name):
    """64x64 leaves the last block a 2x2 grid: with a 1x1 grid, training-mode BatchNorm
    normalises 2 values per channel, which amplifies even float64 rounding to ~1e-4."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=10)
    assert_parity(models.create_model(name, num_classes=10), theirs, torch.randn(2, 3, 64, 64))


def test_densenet_parity_with_dropout_and_recomputation():
    """memory_efficient=True (bottlenecks recomputed in backward) against torchvision's
    plain variant: torchvision's checkpointing (its memory_efficient=True) runs norm1
    twice per step and so updates its running statistics twice; DenseBlock does it once."""
    torch.manual_seed(0)
    theirs = torchvision.models.densenet121(num_classes=10, drop_rate=0.2)
    ours = models.create_model("densenet121", num_classes=10, drop_rate=0.2, memory_efficient=True)
    assert_parity(ours, theirs, torch.randn(2, 3, 64, 64))


def test_densenet_parameter_counts_at_1000_classes():
    expected = {"densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480,
                "densenet201": 20_013_928}
    for name, count in expected.items():
        with torch.device("meta"):
            model = models.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name


@pytest.mark.parametrize("training", [False, True])
def test_stem_blocks_and_transitions_run_fused_ops(training):
    """The stem is one conv_bn_act op; the dense blocks are cnnkernels.nn.DenseBlock (each
    layer's bottleneck unit a bn_act_conv op, its 3x3 unit a bn_act_conv_into op writing
    into the block buffer); each transition's norm-relu-conv is one bn_act_conv op (and,
    in training, one bn_act_conv_backward). Plain torch is left only for the head (norm5,
    relu, pooling, classifier) and the transitions' average pools: no plain convolution."""
    model = models.create_model("densenet121", num_classes=10).train(training)
    assert type(model.features) is FusedSequential
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    assert len(blocks) == 4 and all(type(b) is DenseBlock for b in blocks)
    transitions = [getattr(model.features, f"transition{i}") for i in (1, 2, 3)]
    layers = sum(len(b) for b in blocks)
    x = torch.randn(2, 3, 64, 64, requires_grad=training)
    with torch.set_grad_enabled(training), RecordOps() as forward:
        out = model(x)
    counts = forward.counts
    expected = [c.weight for block, t in zip(blocks, transitions + [None])
                for c in [layer.conv1 for layer in block.values()] + ([t.conv] if t is not None else [])]
    assert forward.bn_act_conv_weights == [w.data_ptr() for w in expected]
    assert counts.get(torch.ops.cnnkernels.bn_act_conv_into.default) == layers
    assert counts.get(torch.ops.cnnkernels.conv_bn_act.default) == 1
    assert counts.get(torch.ops.aten.convolution.default) is None
    assert sum(n for f, n in counts.items() if "batch_norm" in f.name()) == 1  # norm5
    if training:
        with RecordOps() as backward:
            out.sum().backward()
        assert backward.counts.get(torch.ops.cnnkernels.bn_act_conv_backward.default) == 3 + 2 * layers
        assert all(t.norm.weight.grad is not None and t.conv.weight.grad is not None for t in transitions)
        assert all(int(t.norm.num_batches_tracked) == 1 for t in transitions)


def test_densenet121_compiles_fullgraph():
    """Dynamo captures the whole training forward as one graph (fullgraph=True raises on
    any graph break); backend "eager" runs the captured graph as is, which keeps the
    test fast. Outputs, gradients and running statistics match eager mode (which runs the
dense blocks' own autograd.Function, the compiled graph their functional path)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = models.create_model("densenet121", num_classes=10).train()
    compiled_model = models.create_model("densenet121", num_classes=10).train()
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 64)  # at 32x32 the last block's 1x1 grid makes train-mode BN ill-conditioned
    out = torch.compile(compiled_model, fullgraph=True, backend="eager")(x)
    ref = eager(x)
    assert rel_err(out, ref) < 1e-4
    out.sum().backward()
    ref.sum().backward()
    assert rel_err(compiled_model.features.conv0.weight.grad, eager.features.conv0.weight.grad) < 1e-4
    assert rel_err(compiled_model.features.norm0.running_mean, eager.features.norm0.running_mean) < 1e-4
    assert int(compiled_model.features.norm0.num_batches_tracked) == 1
