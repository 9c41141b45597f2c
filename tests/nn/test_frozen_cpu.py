"""The frozen CPU path (cnnkernels/nn/frozen_cpu.py): prepacked oneDNN convolutions for a
frozen model's conv-BN pairs on channels_last float32 / bfloat16 input."""
import copy

import pytest
import torch
from torch import nn

from cnnkernels.nn import ConvBNAct, freeze, unfreeze
from cnnkernels.nn import frozen_cpu
from cnnkernels.nn.freeze import frozen_linear, packed_weights, run_frozen_cpu
from helpers import copies, randomize_batchnorm, rel_err, skip_or_fail

CASES = {  # name: (ConvBNAct kwargs, input shape, residual)
    "3x3_residual": (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), (2, 8, 9, 9), True),
    "1x1_s2_bias_none": (dict(in_channels=16, out_channels=24, kernel_size=1, stride=2, bias=True,
                              activation="none"), (2, 16, 8, 8), False),
    "grouped_residual": (dict(in_channels=32, out_channels=32, kernel_size=3, padding=1, groups=8), (2, 32, 7, 7),
                         True),
    "7x7_s2_dilated": (dict(in_channels=3, out_channels=16, kernel_size=3, stride=2, padding=2, dilation=2),
                       (1, 3, 17, 15), False),
}


@pytest.fixture(autouse=True)
def _require_onednn():
    if not frozen_cpu._support()[0]:
        skip_or_fail("torch has no usable oneDNN: the frozen CPU path cannot run")


def make(case, seed=0, dtype=torch.float32):
    kwargs, shape, with_residual = CASES[case]
    torch.manual_seed(seed)
    module = ConvBNAct(**kwargs)
    randomize_batchnorm(module, seed)
    module = module.eval().to(dtype)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    residual = None
    if with_residual:
        with torch.no_grad():
            residual = torch.randn_like(module(x))
    return module, x, residual


def packed_keys(module):
    return packed_keys_of(module.bn)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_path_matches_the_unfrozen_op_in_float32(case):
    module, x, residual = make(case)
    twin = copy.deepcopy(module)
    freeze(module)
    with torch.inference_mode():
        got, want = module(x, residual), twin(x, residual)
        again = module(x, residual)
    assert packed_keys(module) == [(torch.float32, x.shape)]
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) < 1e-5 and torch.equal(got, again)


@pytest.mark.parametrize("case", ["3x3_residual", "grouped_residual"])
def test_bfloat16_autocast_packs_a_copy_and_matches_autocast(case, bf16_compute):
    module, x, residual = make(case)
    twin = copy.deepcopy(module)
    freeze(module)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = module(x, residual), twin(x, residual)
    with torch.no_grad():
        exact = twin.double()(x.double(), None if residual is None else residual.double())
    assert got.dtype == want.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert packed_keys(module) == [(bf16_compute, x.shape)]
    assert rel_err(got.double(), exact) < max(2 * rel_err(want.double(), exact), 1e-2)
    with torch.no_grad():  # float32 afterwards: a float32 copy is packed next to a bfloat16 one
        module(x, residual)
    assert sorted(map(str, packed_keys(module))) == sorted(map(str, {(bf16_compute, x.shape),
                                                                     (torch.float32, x.shape)}))


def test_bfloat16_model_runs_packed(bf16_compute):
    module, x, residual = make("3x3_residual", dtype=torch.bfloat16)
    twin = copy.deepcopy(module).float()
    freeze(module)
    with torch.no_grad():
        got = module(x, residual)
        want = twin(x.float(), residual.float())
    assert got.dtype == torch.bfloat16 and packed_keys(module) == [(bf16_compute, x.shape)]
    assert rel_err(got.float(), want) < 2e-2


@pytest.mark.parametrize("change", ["load_state_dict", "weight_mul_", "running_mean", "bn_weight"])
def test_packed_weights_follow_every_change(change):
    module, x, residual = make("grouped_residual")
    freeze(module)
    with torch.no_grad():
        before = module(x, residual)
        if change == "load_state_dict":
            module.load_state_dict(make("grouped_residual", seed=1)[0].state_dict())
        elif change == "weight_mul_":
            module.conv.weight.mul_(-0.5)
        elif change == "running_mean":
            module.bn.running_mean.add_(0.25)
        else:
            module.bn.weight.mul_(3.0)
        got = module(x, residual)
        want = unfreeze(copy.deepcopy(module))(x, residual)
    assert rel_err(got, want) < 1e-5 and rel_err(before, want) > 1e-2


def test_one_packed_copy_per_shape_and_at_most_the_limit():
    module, x, _ = make("1x1_s2_bias_none")
    freeze(module)
    shapes = [(n, 16, 8, 8) for n in range(1, frozen_cpu.MAX_PACKED_SHAPES + 3)]
    with torch.no_grad():
        for shape in shapes:
            module(torch.randn(shape).contiguous(memory_format=torch.channels_last))
    kept = packed_keys(module)
    assert len(kept) == frozen_cpu.MAX_PACKED_SHAPES
    assert kept == [(torch.float32, torch.Size(s)) for s in shapes[-frozen_cpu.MAX_PACKED_SHAPES:]]
    unfreeze(module)
    assert not hasattr(module.bn, "_cnnkernels_freeze")


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_residual_writes_into_it_only_when_allowed(overwrite):
    module, x, residual = make("3x3_residual")
    freeze(module)
    kept = residual.clone()
    with torch.no_grad():
        want = unfreeze(copy.deepcopy(module))(x, kept)
        got = run_frozen_cpu(module.conv, module.bn, x, residual, "relu", overwrite_residual=overwrite)
    assert rel_err(got, want) < 1e-5
    assert (got.data_ptr() == residual.data_ptr()) == overwrite
    assert torch.equal(residual, got if overwrite else kept)


def test_paths_that_are_not_taken():
    module, x, residual = make("3x3_residual")
    freeze(module)
    nchw = x.contiguous()
    with torch.no_grad():
        assert run_frozen_cpu(module.conv, module.bn, nchw, residual, "relu") is None  # NCHW
        assert run_frozen_cpu(module.conv, module.bn, x.double(), residual, "relu") is None  # float64
        assert run_frozen_cpu(module.conv, module.bn, x, residual, "gelu") is None  # unknown activation
        assert run_frozen_cpu(module.conv, module.bn, x, residual[:, :, :-1], "relu") is None  # wrong shape
        assert run_frozen_cpu(module.conv, module.bn, x[:, :-1], residual, "relu") is None  # wrong channels
        module.train()
        assert run_frozen_cpu(module.conv, module.bn, x, residual, "relu") is None  # training
        module.eval()
    out = module(x, residual)  # gradients wanted: the plain op, with autograd
    assert out.requires_grad and packed_keys(module) == []
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="residual"):
        module(x, residual[:, :, :-1])
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="channels"):
        module(x[:, :-1], residual)


def test_frozen_resnet_in_channels_last_matches_torchvision_in_float32_and_bfloat16(bf16_compute):
    torchvision = pytest.importorskip("torchvision")
    from cnnkernels import models
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    randomize_batchnorm(ref)
    net = models.resnet18(num_classes=10).eval()
    net.load_state_dict(ref.state_dict())
    freeze(net.to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        exact = copy.deepcopy(ref).double()(x.double())
        assert rel_err(net(x).double(), exact) < 1e-5
        packed = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and packed_keys_of(m)]
        assert len(packed) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            got = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = ref(x)
        assert got.dtype == want.dtype
        assert rel_err(got.double(), exact) < max(2 * rel_err(want.double(), exact), 2e-2)
        packed_calls = sum(e.name in ("mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_")
                           for e in prof.events())
        assert packed_calls == len(packed)
        assert {key[0] for m in packed for key in packed_keys_of(m)} == {torch.float32, bf16_compute}


def _in_place_convolutions(net, x):
    with torch.profiler.profile() as prof:
        out = net(x)
    return out, sum(e.name == "mkldnn::_convolution_pointwise_" for e in prof.events())


@pytest.mark.parametrize("builder", ["resnet18", "resnet50"])
def test_frozen_resnet_writes_identity_blocks_into_their_input_unless_a_hook_could_see_it(builder):
    """ResNet.forward_features lets each block overwrite its (own, intermediate) input: the
    last conv of every block then runs in oneDNN's in-place sum form, as torch.compile's
    frozen graphs do; a forward hook on a block or stage turns that off, and what the hook
    kept is the block's output, untouched by the next block."""
    torchvision = pytest.importorskip("torchvision")
    from cnnkernels import models
    torch.manual_seed(0)
    ref = getattr(torchvision.models, builder)(num_classes=10).eval()
    randomize_batchnorm(ref)
    net = getattr(models, builder)(num_classes=10).eval()
    net.load_state_dict(ref.state_dict())
    freeze(net.to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    blocks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
    with torch.inference_mode():
        exact = copy.deepcopy(ref).double()(x.double())
        out, in_place = _in_place_convolutions(net, x)
        assert rel_err(out.double(), exact) < 1e-5
        assert in_place == len(blocks)

        kept = {}
        handle = blocks[0].register_forward_hook(lambda m, args, output: kept.update(output=output.clone(),
                                                                                     alias=output))
        out, in_place = _in_place_convolutions(net, x)
        handle.remove()
        assert rel_err(out.double(), exact) < 1e-5
        assert torch.equal(kept["alias"], kept["output"]), "the next block overwrote a hooked output"
        assert in_place == sum(b.downsample is not None for b in blocks)
        assert rel_err(blocks[0](net.forward_stem(x)).double(), kept["output"].double()) < 1e-6


def packed_keys_of(module):
    packed = packed_weights(module)
    return [] if packed is None else list(packed.by_shape)


def test_a_frozen_model_with_packed_weights_deep_copies_and_pickles():
    module, x, residual = make("3x3_residual")
    freeze(module)
    with torch.no_grad():
        want = module(x, residual)
        assert packed_keys(module)
        for other in copies(module):
            assert packed_keys(other) == []
            assert torch.equal(other(x, residual), want) and packed_keys(other) == [(torch.float32, x.shape)]


def _op_counts(net, x, names):
    with torch.profiler.profile() as prof:
        out = net(x)
    return out, {name: sum(e.name == name for e in prof.events()) for name in names}


@pytest.mark.parametrize("builder, pool_name", [("resnet18", "maxpool"), ("densenet121", "features.pool0")])
def test_frozen_stem_max_pools_without_indices_unless_hooked(builder, pool_name):
    """A frozen model's stem max-pool runs as the indices-free native pass, equal to torch's
    (max only selects); a forward hook on the pool brings back the module call."""
    from cnnkernels import _library, models
    if not _library.has_native_kernel("_max_pool2d_channels_last_native", "CPU"):
        skip_or_fail("cnnkernels._C with the CPU max-pool kernel is not loaded")
    torch.manual_seed(0)
    net = getattr(models, builder)(num_classes=10).eval()
    randomize_batchnorm(net)
    plain = copy.deepcopy(net).to(memory_format=torch.channels_last)
    freeze(net.to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    names = ("cnnkernels::_max_pool2d_channels_last_native", "aten::max_pool2d_with_indices")
    with torch.inference_mode():
        want = plain(x)
        out, counts = _op_counts(net, x, names)
        assert counts == {names[0]: 1, names[1]: 0}
        assert rel_err(out.double(), want.double()) < 1e-5
        seen = []
        handle = net.get_submodule(pool_name).register_forward_hook(lambda m, args, output: seen.append(output))
        out, counts = _op_counts(net, x, names)
        handle.remove()
        assert counts == {names[0]: 0, names[1]: 1} and len(seen) == 1
        assert rel_err(out.double(), want.double()) < 1e-5


@pytest.mark.parametrize("builder", ["resnet18", "densenet121"])
def test_frozen_classifier_casts_its_weight_once_under_bfloat16_autocast(builder):
    """The frozen classifier keeps a bfloat16 copy of its weight (autocast's cast, made
    once, made again after a change), and a hook on it brings back the module call."""
    from cnnkernels import models
    torch.manual_seed(0)
    net = freeze(getattr(models, builder)(num_classes=10).eval())
    head = net.fc if builder == "resnet18" else net.classifier
    x = torch.randn(2, 3, 64, 64)
    shape = [list(head.weight.shape)]

    def weight_casts():
        with torch.profiler.profile(record_shapes=True) as prof:
            out = net(x)
        return out, sum(e.name == "aten::_to_copy" and e.input_shapes[:1] == shape for e in prof.events())

    features = torch.randn(2, head.in_features)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        _, casts = weight_casts()
        assert casts == 0
        first = frozen_linear(head, features)
        assert torch.equal(first, head(features))  # bitwise autocast's own per-call cast
        with torch.no_grad():
            head.weight.mul_(2)
        _, casts = weight_casts()
        assert casts == 1  # cast again after the change, once
        assert torch.equal(frozen_linear(head, features), head(features))
        handle = head.register_forward_hook(lambda *args: None)
        _, casts = weight_casts()
        handle.remove()
        assert casts == 1
        unfreeze(net)
        _, casts = weight_casts()
        assert casts == 1


def test_frozen_se_blocks_gate_their_own_output_in_place_unless_hooked():
    """A frozen SE-ResNet's gates run in place on each block's own conv3 output (no output
    tensor allocated), equal to the op's result; a hook on a block's se module brings the
    module call back for that block."""
    from cnnkernels import _library, models
    if not _library.has_native_kernel("_se_excite_inplace_native", "CPU"):
        skip_or_fail("cnnkernels._C with the in-place SE kernel is not loaded")
    torch.manual_seed(0)
    net = models.se_resnet50(num_classes=10).eval()
    randomize_batchnorm(net)
    plain = copy.deepcopy(net).to(memory_format=torch.channels_last)
    freeze(net.to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    blocks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
    names = ("cnnkernels::_se_excite_inplace_native", "cnnkernels::_se_excite_forward_native")
    with torch.inference_mode():
        want = plain(x)
        out, counts = _op_counts(net, x, names)
        assert counts == {names[0]: len(blocks), names[1]: 0}
        assert rel_err(out.double(), want.double()) < 1e-5
        seen = []
        handle = blocks[3].se.register_forward_hook(lambda m, args, output: seen.append(output))
        out, counts = _op_counts(net, x, names)
        handle.remove()
        assert counts == {names[0]: len(blocks) - 1, names[1]: 1} and len(seen) == 1
        assert rel_err(out.double(), want.double()) < 1e-5
