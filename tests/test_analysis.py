"""cnnkernels.analysis.summary: the lecture notes' AlexNet numbers, totals equal to the
parameter counts, fused and unfused networks giving the same table, byte accounting,
batch scaling, and the printed table."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cnnkernels import models
from cnnkernels.analysis import LayerRow, Summary, summary


def test_alexnet_conv1_row_is_the_notes_row():
    table = summary(models.create_model("alexnet"), (3, 227, 227))
    row = table.rows[0]
    assert (row.name, row.kind, row.output_shape) == ("features.0", "conv+relu", (64, 56, 56))
    assert row.memory_kb == 784.0
    assert row.params == 23_296 == 64 * 3 * 11 * 11 + 64
    assert row.flops == 72_855_552 == (64 * 56 * 56) * (3 * 11 * 11)


def test_alexnet_other_rows_follow_the_notes_formulas():
    table = summary(models.create_model("alexnet"), (3, 227, 227))
    pool1 = table["features.2"]
    assert (pool1.kind, pool1.output_shape, pool1.memory_kb, pool1.params) == ("maxpool", (64, 27, 27), 182.25, 0)
    assert pool1.flops == 64 * 27 * 27 * 3 * 3  # the notes' 0.4 MFLOP
    assert table["flatten"].output_shape == (9216,) and table["flatten"].bytes_fused == 0
    fc6 = table["classifier.1"]
    assert fc6.params == 9216 * 4096 + 4096 and fc6.flops == 9216 * 4096 and fc6.kind == "linear+relu"
    assert [r.output_shape for r in table.rows if r.kind.startswith("conv")] == [
        (64, 56, 56), (192, 27, 27), (384, 13, 13), (256, 13, 13), (256, 13, 13)]
    assert table.total_params == 61_100_840


def test_bytes_moved_unfused_and_fused():
    """AlexNet conv1 + ReLU: unfused, the conv reads x, w, b and writes y, then ReLU reads
    and writes y; fused, x, w, b are read and y written once."""
    row = summary(models.create_model("alexnet"), (3, 227, 227)).rows[0]
    x, w, y = 3 * 227 * 227, 64 * 3 * 11 * 11 + 64, 64 * 56 * 56
    assert row.bytes_unfused == 4 * (x + w + y + 2 * y)
    assert row.bytes_fused == 4 * (x + w + y)


def test_conv_bn_relu_rows_and_totals_equal_parameter_counts():
    model = models.create_model("vgg11_bn", num_classes=10)
    table = summary(model, (3, 32, 32))
    convs = [r for r in table.rows if "conv" in r.kind]
    assert len(convs) == 8 and all(r.kind == "conv+bn+relu" for r in convs)
    first = convs[0]
    assert first.params == 64 * 27 + 64 + 2 * 64  # conv weight + bias, BN gamma + beta
    y = 64 * 32 * 32
    # unfused: conv (x, w, b, y), BN (y in, y out, 4 per-channel vectors), ReLU (y in, y out)
    assert first.bytes_unfused == 4 * (3 * 32 * 32 + 64 * 27 + 64 + y + 2 * y + 4 * 64 + 2 * y)
    assert first.bytes_fused == 4 * (3 * 32 * 32 + 64 * 27 + 64 + 4 * 64 + y)
    assert table.total_params == sum(p.numel() for p in model.parameters())
    densenet = models.create_model("densenet121", num_classes=10)
    assert summary(densenet, (3, 32, 32)).total_params == sum(p.numel() for p in densenet.parameters())


def test_fused_and_unfused_networks_give_the_same_table():
    """Ours runs ConvBNAct (fused op), torchvision's runs conv, bn and relu in turn: the
    costs recorded are the same; only the fused units' names differ (conv1 vs conv1.conv)."""
    torch.manual_seed(0)
    ours = summary(models.create_model("googlenet", num_classes=10), (3, 64, 64))
    theirs = summary(torchvision.models.googlenet(num_classes=10, init_weights=False), (3, 64, 64))
    strip = lambda r: (r.kind, r.output_shape, r.memory_kb, r.params, r.flops, r.bytes_unfused,  # noqa: E731
                       r.bytes_fused)
    assert [strip(r) for r in ours.rows] == [strip(r) for r in theirs.rows]
    assert [r.name for r in ours.rows][:3] == ["conv1", "maxpool1", "conv2"]
    assert [r.name for r in theirs.rows][:3] == ["conv1.conv", "maxpool1", "conv2.conv"]
    model = models.create_model("googlenet", num_classes=10)
    aux = sum(p.numel() for n, p in model.named_parameters() if n.startswith("aux"))
    # eval mode: the aux heads do not run
    assert ours.total_params == sum(p.numel() for p in model.parameters()) - aux == 5_610_154


def test_pre_activation_and_residual_rows():
    dense = summary(models.create_model("densenet121", num_classes=10), (3, 32, 32))
    kinds = [r.kind for r in dense.rows]
    assert kinds[0] == "conv+bn+relu"  # the fused stem
    # every dense layer is two fused bn_act_conv ops (norm1-relu1-conv1, norm2-relu2-conv2 into its
    # slice of the block buffer), plus one per transition: 2 * 58 + 3
    assert kinds.count("bn+relu+conv") == 119
    conv2 = dense["features.denseblock1.denselayer1.conv2"]
    assert conv2.output_shape == (32, 8, 8) and conv2.params == 128 * 32 * 9 + 2 * 128
    resnet = summary(torchvision.models.resnet18(num_classes=10), (3, 64, 64))
    assert [r.kind for r in resnet.rows].count("conv+bn+add+relu") == 8


def test_fused_add_act_and_squeeze_excite_ops_are_costed():
    import cnnkernels

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.se = cnnkernels.nn.SqueezeExcite(8, rd_channels=2)

        def forward(self, x):
            y = cnnkernels.ops.add_act(self.conv(x), x, activation="relu")
            return self.se(y)

    model = Block()
    table = summary(model, (8, 6, 6))
    assert [r.kind for r in table.rows] == ["conv+add+relu", "se"]
    assert [r.name for r in table.rows] == ["conv", "se"]
    y = 8 * 6 * 6 * 4
    assert table.rows[0].bytes_unfused == (y + 8 * 72 * 4 + 8 * 4 + y) + 3 * y + 2 * y
    assert table.rows[0].bytes_fused == 2 * y + 8 * 72 * 4 + 8 * 4 + y  # x (conv input and residual), w, b, out
    assert table.total_params == sum(p.numel() for p in model.parameters())
    se_net = models.create_model("se_resnet50", num_classes=10)
    assert summary(se_net, (3, 32, 32)).total_params == sum(p.numel() for p in se_net.parameters())


@pytest.mark.parametrize("activation, kind, unfused_passes", [("relu", "add+relu", 5), ("none", "add", 3)])
def test_a_standalone_add_act_is_costed(activation, kind, unfused_passes):
    """Read x and residual, write the sum (and read it, write the ReLU) unfused; read two,
    write one fused; no flops counted for element-wise work."""
    import cnnkernels

    class Add(nn.Module):
        def forward(self, x):
            return cnnkernels.ops.add_act(x, x * 2, activation=activation)

    (row,) = summary(Add(), (8, 6, 6)).rows
    y = 8 * 6 * 6 * 4
    assert (row.kind, row.flops, row.params) == (kind, 0, 0)
    assert (row.bytes_unfused, row.bytes_fused) == (unfused_passes * y, 3 * y)


def test_batch_size_scales_memory_flops_and_activation_bytes():
    model = models.create_model("alexnet", num_classes=10)
    one, two = summary(model, (3, 64, 64)), summary(model, (3, 64, 64), batch_size=2)
    for a, b in zip(one.rows, two.rows, strict=True):
        assert b.memory_kb == 2 * a.memory_kb and b.flops == 2 * a.flops and b.params == a.params
        assert b.bytes_unfused >= a.bytes_unfused


def test_model_state_is_left_alone():
    model = models.create_model("vgg11_bn", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary(model, (3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.features[0]._forward_hooks and not model.features[0]._forward_pre_hooks


def test_printed_table_is_aligned_with_totals():
    table = summary(models.create_model("alexnet"), (3, 227, 227))
    assert isinstance(table, Summary) and all(isinstance(r, LayerRow) for r in table.rows)
    lines = str(table).splitlines()
    assert lines[0] == "input 1x3x227x227"
    assert len(lines) == 1 + 2 + len(table.rows) + 2
    assert len({len(line) for line in lines[1:]}) == 1
    header, first, total = lines[1], lines[3], lines[-1]
    for column in ("layer", "kind", "output (C,H,W)", "memory KB", "params", "flops"):
        assert column in header
    assert first.split()[:6] == ["features.0", "conv+relu", "64x56x56", "784.0", "23,296", "72,855,552"]
    assert total.startswith("total") and "61,100,840" in total
    assert table.totals["params"] == 61_100_840


def test_functional_calls_inside_a_module_are_named_after_it():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.conv(x), nn.functional.max_pool2d(x, 3, 1, 1)], 1)

    table = summary(nn.Sequential(Block()), (3, 8, 8))
    assert [(r.name, r.kind) for r in table.rows] == [("0.conv", "conv"), ("0:maxpool", "maxpool"),
                                                      ("0:cat", "cat")]
    assert table.rows[-1].output_shape == (7, 8, 8) and table.rows[1].flops == 3 * 8 * 8 * 9


def test_input_size_may_include_the_batch():
    model = models.create_model("alexnet", num_classes=10)
    batched, plain = summary(model, (2, 3, 64, 64)), summary(model, (3, 64, 64), batch_size=2)
    assert [r.flops for r in batched.rows] == [r.flops for r in plain.rows]
    assert batched.batch_size == 2 and tuple(batched.input_size) == (3, 64, 64)
    with pytest.raises(ValueError, match="batch_size=3 was passed too"):
        summary(model, (2, 3, 64, 64), batch_size=3)
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\) or \(N, C, H, W\)"):
        summary(model, (64, 64))
