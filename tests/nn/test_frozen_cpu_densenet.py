"""The frozen CPU path of DenseNet's pre-activation units (freeze.run_frozen_cpu_bn_act_conv):
dense layers as relu(norm1(prefix)) -> conv1 with norm2 folded -> conv2, both packed, and
transitions with the average pool moved before their 1x1 convolution."""
import copy
import pickle

import pytest
import torch
from torch import nn

from cnnkernels.nn import DenseBlock, freeze, frozen_cpu, frozen_dense, unfreeze
from cnnkernels.nn.freeze import packed_weights, run_frozen_cpu_bn_act_conv
from helpers import randomize_batchnorm, rel_err, skip_or_fail


@pytest.fixture(autouse=True)
def _require_onednn():
    if not frozen_cpu._support()[0]:
        skip_or_fail("torch has no usable oneDNN: the frozen CPU path cannot run")


def block_and_input(seed=0, channels_last=True):
    torch.manual_seed(seed)
    block = DenseBlock(num_layers=3, num_input_features=12, bn_size=2, growth_rate=8).eval()
    randomize_batchnorm(block, seed)
    x = torch.randn(2, 12, 9, 7)
    return block, x.contiguous(memory_format=torch.channels_last) if channels_last else x


def packed_units(block):
    """How many of the block's modules hold packed weights: norm2 (conv1 folded) and conv2 per layer."""
    return sum(packed_weights(m) is not None and bool(packed_weights(m).by_shape)
               for layer in block.values() for m in (layer.norm2, layer.conv2))


def exact_block(block, x):
    """The block in float64 through the modules themselves, torch.cat, no cnnkernels op."""
    features = [x.double()]
    for layer in block.values():
        layer = copy.deepcopy(layer).double()
        z = torch.cat(features, 1)
        z = layer.conv1(torch.relu(layer.norm1(z)))
        features.append(layer.conv2(torch.relu(layer.norm2(z))))
    return torch.cat(features, 1)


def test_frozen_dense_block_matches_the_exact_block_and_packs_every_layer():
    block, x = block_and_input()
    twin = copy.deepcopy(block)
    freeze(block)
    with torch.inference_mode():
        got = block(x)
        want = twin(x)
    exact = exact_block(block, x)
    assert packed_units(block) == 2 * len(block)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got.double(), exact) < 1e-5 and rel_err(want.double(), exact) < 1e-5
    assert torch.equal(got[:, :12], x)


def test_frozen_dense_block_under_bfloat16_autocast(bf16_compute):
    block, x = block_and_input(seed=1)
    twin = copy.deepcopy(block)
    freeze(block)
    exact = exact_block(block, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = block(x), twin(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert packed_units(block) == 2 * len(block)
    assert rel_err(got.double(), exact) < max(2 * rel_err(want.double(), exact), 2e-2)
    assert {key[0] for layer in block.values() for m in (layer.norm2, layer.conv2)
            for key in packed_weights(m).by_shape} == {bf16_compute}
    # packed once: later calls cast no weight, only the float32 input to bfloat16 (and,
    # emulated, each layer's bfloat16 prefix to float32 for its float32 convolution)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        again = block(x)
    widened = 0 if bf16_compute == torch.bfloat16 else len(block)
    assert sum(e.name == "aten::_to_copy" for e in prof.events()) == 1 + widened
    assert torch.equal(again, got)


def test_frozen_dense_block_follows_parameter_changes():
    block, x = block_and_input(seed=2)
    freeze(block)
    with torch.no_grad():
        before = block(x)
        block["denselayer2"].norm1.running_mean.add_(0.5)
        block["denselayer3"].conv2.weight.mul_(-1.0)
        block["denselayer1"].norm2.weight.mul_(2.0)
        got = block(x)
    want = exact_block(block, x)
    assert rel_err(got.double(), want) < 1e-5 and rel_err(before.double(), want) > 1e-2


def _planned_calls(block, x, monkeypatch):
    """block(x) under no_grad, and whether the recorded plan (frozen_dense.run) ran it."""
    ran = []
    real = frozen_dense.run

    def spy(*args):
        ran.append(real(*args))
        return ran[-1]

    monkeypatch.setattr(frozen_dense, "run", spy)
    with torch.no_grad():
        out = block(x)
    monkeypatch.setattr(frozen_dense, "run", real)
    return out, ran == [True]


def test_frozen_dense_block_replays_its_plan_and_drops_it_on_any_change(monkeypatch):
    """The second frozen call replays the plan recorded by the first, bit for bit; an
    in-place change, a replaced parameter, a module in training mode or unfreeze make it
    stand aside (the per-layer path re-folds and records again)."""
    block, x = block_and_input(seed=5)
    freeze(block)
    first, planned = _planned_calls(block, x, monkeypatch)
    assert not planned
    again, planned = _planned_calls(block, x, monkeypatch)
    assert planned and torch.equal(again, first)
    assert rel_err(again.double(), exact_block(block, x)) < 1e-5
    _, planned = _planned_calls(block, x[:1].contiguous(memory_format=torch.channels_last), monkeypatch)
    assert not planned  # another shape: a plan of its own

    changes = [
        lambda: block["denselayer2"].norm1.running_var.mul_(3.0),
        lambda: block["denselayer3"].conv2.weight.mul_(-1.0),
        lambda: setattr(block["denselayer1"].conv1, "weight",
                        nn.Parameter(torch.randn_like(block["denselayer1"].conv1.weight))),
        lambda: setattr(block["denselayer2"].norm2, "eps", 0.5),
    ]
    for change in changes:
        with torch.no_grad():
            change()
        got, planned = _planned_calls(block, x, monkeypatch)
        assert not planned
        assert rel_err(got.double(), exact_block(block, x)) < 1e-5
        again, planned = _planned_calls(block, x, monkeypatch)
        assert planned and torch.equal(again, got)

    block["denselayer3"].norm2.train()
    with torch.no_grad():
        block["denselayer3"].norm2.running_mean.zero_()  # what a training-mode call would update
    _, planned = _planned_calls(block, x, monkeypatch)
    assert not planned
    block["denselayer3"].norm2.eval()
    _planned_calls(block, x, monkeypatch)
    twin = pickle.loads(pickle.dumps(copy.deepcopy(block)))
    got, planned = _planned_calls(twin, x, monkeypatch)
    assert not planned and rel_err(got.double(), exact_block(block, x)) < 1e-5
    unfreeze(block)
    assert not any(vars(m).get("_cnnkernels_dense_plans") for m in block.modules())
    got, planned = _planned_calls(block, x, monkeypatch)
    assert not planned and rel_err(got.double(), exact_block(block, x)) < 1e-5


def test_dense_block_paths_not_taken():
    block, x = block_and_input(seed=3, channels_last=False)
    freeze(block)
    with torch.no_grad():
        got = block(x)  # NCHW: the plain in-place forward
    assert packed_units(block) == 0
    assert rel_err(got.double(), exact_block(block, x)) < 1e-5
    block, x = block_and_input(seed=3)
    freeze(block)
    got = block(x)  # gradients wanted: the block's autograd Function
    assert got.requires_grad and packed_units(block) == 0
    block["denselayer1"].drop_rate = 0.5
    block.train()
    block["denselayer1"].norm1.eval(), block["denselayer1"].norm2.eval()
    with torch.no_grad():
        block(x)  # layer 1 drops features in training mode: not frozen
    assert packed_units(block) == 0
    unfreeze(block)
    assert not any(hasattr(m, "_cnnkernels_freeze") for m in block.modules())


def transition(seed=0):
    torch.manual_seed(seed)
    norm, conv = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, bias=False)
    randomize_batchnorm(norm, seed)
    norm.eval()
    freeze(norm), freeze(conv)
    return norm, conv


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_pool_before_the_1x1_convolution_is_the_same_function(size):
    norm, conv = transition()
    pool = nn.AvgPool2d(2, 2)
    x = torch.randn(2, 16, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = run_frozen_cpu_bn_act_conv(norm, conv, x, pool=pool)
        exact = pool(conv.double()(torch.relu(norm.double()(x.double()))))
    assert got.shape == exact.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got.double(), exact) < 1e-5


def test_pool_is_not_moved_where_it_would_change_the_function():
    norm, conv = transition()
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    padded = nn.AvgPool2d(2, 2, padding=1)  # the zero padding would meet conv's bias, not 0
    strided, padded_conv = nn.Conv2d(16, 8, 1, stride=2), nn.Conv2d(16, 8, 1, padding=1)
    freeze(strided), freeze(padded_conv)
    with torch.no_grad():
        assert run_frozen_cpu_bn_act_conv(norm, conv, x, pool=padded) is None
        assert run_frozen_cpu_bn_act_conv(norm, strided, x, pool=nn.AvgPool2d(2)) is None
        assert run_frozen_cpu_bn_act_conv(norm, padded_conv, x, pool=nn.AvgPool2d(2)) is None
        assert run_frozen_cpu_bn_act_conv(norm, conv, x, pool=nn.MaxPool2d(2)) is None
        assert run_frozen_cpu_bn_act_conv(norm, conv, x[:, :8]) is None  # wrong channels
        norm.train()
        assert run_frozen_cpu_bn_act_conv(norm, conv, x) is None


def test_frozen_densenet_in_channels_last_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    from cnnkernels.models.densenet import DenseNet
    torch.manual_seed(0)
    config = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=10)
    ref = torchvision.models.DenseNet(**config).eval()
    randomize_batchnorm(ref)
    net = DenseNet(**config).eval()
    net.load_state_dict(ref.state_dict())
    freeze(net.to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        exact = copy.deepcopy(ref).double()(x.double())
        assert rel_err(net(x).double(), exact) < 1e-5
        transition = net.features.transition1
        assert packed_weights(transition.conv).by_shape
        assert next(iter(packed_weights(transition.conv).by_shape))[1][2] == 8  # pooled 16x16 -> 8x8
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = net(x), ref(x)
        assert got.dtype == want.dtype
        assert rel_err(got.double(), exact) < max(2 * rel_err(want.double(), exact), 2e-2)


def test_frozen_dense_block_without_the_native_passes(monkeypatch):
    """Where the extension lacks the C++ scale-shift pass, relu(norm1(prefix)) is an addcmul
    and an in-place ReLU: same results to rounding, per layer and replayed."""
    monkeypatch.setattr(frozen_cpu, "native", lambda op_name: False)
    block, x = block_and_input(seed=6)
    freeze(block)
    exact = exact_block(block, x)
    with torch.no_grad():
        first, again = block(x), block(x)
    assert torch.equal(first, again)
    assert rel_err(first.double(), exact) < 1e-5


NATIVE_BLOCK = "_dense_block_frozen_native"


def _native_block_calls(block, x):
    with torch.profiler.profile() as prof:
        out = block(x)
    return out, sum(e.name == f"cnnkernels::{NATIVE_BLOCK}" for e in prof.events())


@pytest.mark.parametrize("autocast", [False, True])
def test_a_replayed_block_runs_as_one_native_call_bitwise_the_per_layer_replay(autocast, bf16_compute,
                                                                              monkeypatch):
    """The plan's replay runs the whole block in one _dense_block_frozen_native call where
    the buffer is in the compute dtype (float32, or bfloat16 where oneDNN has bfloat16
    convolutions): the same kernels as the per-layer replay in Python, bit for bit."""
    if not frozen_cpu.native(NATIVE_BLOCK):
        skip_or_fail(f"cnnkernels._C with the CPU kernel {NATIVE_BLOCK} is not loaded")
    block, x = block_and_input(seed=7)
    freeze(block)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first, calls_first = _native_block_calls(block, x)
        native, calls_native = _native_block_calls(block, x)
        real = frozen_cpu.native
        monkeypatch.setattr(frozen_cpu, "native", lambda name: name != NATIVE_BLOCK and real(name))
        per_layer, calls_per_layer = _native_block_calls(block, x)
    in_compute_dtype = not autocast or bf16_compute == torch.bfloat16
    assert (calls_first, calls_native, calls_per_layer) == (0, int(in_compute_dtype), 0)
    assert torch.equal(native, per_layer) and torch.equal(native, first)
