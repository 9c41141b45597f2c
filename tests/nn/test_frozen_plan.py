"""Recorded plans of a frozen model's CPU forward (cnnkernels/nn/frozen_plan.py): recorded
on the second call of an input signature, replayed from the third, bit for bit the
unreplayed forward, and never replayed once the model is not in its recorded state."""
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cnnkernels import models
from cnnkernels.nn import freeze, frozen_cpu, frozen_plan, unfreeze
from cnnkernels.nn.frozen_plan import _Plan
from helpers import copies, randomize_batchnorm, skip_or_fail

BUILDERS = ["resnet18", "se_resnet50", "resnext50_32x4d", "densenet121", "vgg11_bn", "alexnet", "googlenet",
            "bn_inception", "inception_v3", "preact_resnet18"]
SIZES = {"alexnet": 64, "inception_v3": 80, "bn_inception": 64}


@pytest.fixture(autouse=True)
def _require_onednn():
    if not frozen_cpu._support()[0]:
        skip_or_fail("torch has no usable oneDNN: the frozen CPU path cannot run")


@pytest.fixture
def replays(monkeypatch):
    """The number of replayed calls so far (a list of one count)."""
    count = [0]
    original = _Plan.replay

    def counted(self, x):
        count[0] += 1
        return original(self, x)

    monkeypatch.setattr(_Plan, "replay", counted)
    return count


def make(builder="resnet18", seed=0, size=32, batch=2):
    torch.manual_seed(seed)
    net = getattr(models, builder)(num_classes=10)
    randomize_batchnorm(net, seed)
    net = freeze(net.eval().to(memory_format=torch.channels_last))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return net, x


def warm(net, x, calls=2):
    for _ in range(calls):
        net(x)


@pytest.mark.parametrize("native", [True, False], ids=["cpp-replay", "python-replay"])
@pytest.mark.parametrize("builder", BUILDERS)
def test_replayed_calls_are_bitwise_the_unreplayed_forward(builder, native, replays, monkeypatch):
    if native and not hasattr(sys.modules.get("cnnkernels._C"), "ReplayPlan"):
        skip_or_fail("the compiled extension (with cnnkernels._C.ReplayPlan) is not loaded")
    monkeypatch.setattr(frozen_plan, "NATIVE_REPLAY", native)
    net, x = make(builder, size=SIZES.get(builder, 32))
    with torch.no_grad():
        first, second = net(x), net(x)
        assert replays[0] == 0 and isinstance(frozen_plan.plans(net)[frozen_plan._signature(x)], _Plan)
        assert (frozen_plan.plans(net)[frozen_plan._signature(x)].native is not None) == native
        other = torch.randn_like(x)
        got, got_other = net(x), net(other)
        assert replays[0] == 2
        want, want_other = net._forward(x), net._forward(other)
    for out in (first, second, got):
        assert torch.equal(out, want)
    plan = frozen_plan.plans(net)[frozen_plan._signature(x)]
    for _, constants, filled, nested, *_ in plan.steps:  # ops on constants only ran once, at recording
        assert filled or nested or not any(isinstance(c, torch.Tensor) for c in constants)
    assert torch.equal(got_other, want_other) and not torch.equal(got_other, got)


@pytest.mark.parametrize("builder", ["resnet18", "densenet121"])
def test_bfloat16_autocast_and_inference_mode_are_signatures_of_their_own(builder, replays):
    net, x = make(builder)
    with torch.no_grad():
        warm(net, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [net(x) for _ in range(3)]
        want = net._forward(x)
    with torch.inference_mode():
        inference = [net(x) for _ in range(3)]
        inference_want = net._forward(x)
    assert replays[0] == 2 and len(frozen_plan.plans(net)) == 3
    assert all(out.dtype == torch.bfloat16 and torch.equal(out, want) for out in outs)
    assert all(torch.equal(out, inference_want) for out in inference)


def _load_other_state(net):
    other, _ = make(seed=1)
    net.load_state_dict(other.state_dict())


def _replace_classifier(net):
    torch.manual_seed(3)
    net.fc = nn.Linear(net.fc.in_features, 10).eval()


CHANGES = {  # name: (change, whether it lasts: the signature is then replayed again two calls later)
    "load_state_dict": (_load_other_state, True),
    "weight_mul_": (lambda net: net.layer1[0].conv1.weight.mul_(0.5), True),
    "running_var_add_": (lambda net: net.layer2[0].bn2.running_var.add_(1.0), True),
    "data_assigned": (lambda net: setattr(net.layer3[1].conv2.weight, "data",
                                          net.layer3[1].conv2.weight.data * 2), True),
    "module_replaced": (_replace_classifier, True),
    "bn_eps": (lambda net: setattr(net.layer1[1].bn1, "eps", 0.5), True),
    "pool_padding": (lambda net: setattr(net.maxpool, "padding", 0), True),
    "submodule_unfrozen": (lambda net: unfreeze(net.layer2), True),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_of_the_model_is_never_replayed_over(change, replays):
    net, x = make()
    with torch.no_grad():
        warm(net, x, 3)
        assert replays[0] == 1
        before = net(x)
        apply, lasting = CHANGES[change]
        apply(net)
        got = net(x)
        assert replays[0] == 2  # the changed call ran unreplayed
        want = net._forward(x)
        assert torch.equal(got, want)
        if change != "submodule_unfrozen":  # the unfrozen units may round alike
            assert not torch.equal(got, before)
        again = [net(x) for _ in range(2)]
    assert replays[0] == (3 if lasting else 2)
    assert all(torch.equal(out, want) for out in again)


def test_hooks_training_mode_and_wanted_gradients_are_never_replayed_over(replays):
    net, x = make()
    with torch.no_grad():
        warm(net, x, 3)
    assert replays[0] == 1
    out = net(x)  # grad mode on and the parameters want gradients: the autograd graph is built
    assert out.requires_grad and replays[0] == 1
    seen = []
    for register in (net.layer3[0].register_forward_hook, net.layer2[1].register_forward_pre_hook,
                     nn.modules.module.register_module_forward_hook):
        handle = register(lambda *args: seen.append(1))
        with torch.no_grad():
            net(x), net(x), net(x)
        handle.remove()
        assert len(seen) >= 3 and replays[0] == 1  # the global hook sees every module call
        seen.clear()
    net.layer1.train()
    with torch.no_grad():
        net(x), net(x), net(x)
    assert replays[0] == 1
    net.eval()
    out = net(x)  # grad mode on and the parameters want gradients: the autograd graph is built
    assert out.requires_grad and replays[0] == 1
    out.sum().backward()
    assert net.fc.weight.grad is not None
    with torch.no_grad():
        assert not net(x).requires_grad and replays[0] == 1  # recorded (the statistics changed in training)
        got = net(x.clone().requires_grad_())  # no gradient wanted under no_grad: replayed
        assert replays[0] == 2 and torch.equal(got, net._forward(x))


def test_successive_outputs_are_fresh_tensors_and_the_input_is_left_alone(replays):
    net, x = make()
    other = torch.randn_like(x)
    with torch.no_grad():
        warm(net, x)
        x_before = x.clone()
        first = net(x)
        kept = first.clone()
        second = net(other)
    assert replays[0] == 2
    assert torch.equal(first, kept) and torch.equal(x, x_before)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


def test_each_signature_has_its_plan_and_at_most_the_limit_are_kept(replays):
    net, _ = make()
    sizes = [32, 40, 48, 56, 64]
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
            outs = [net(x) for _ in range(3)]
            assert torch.equal(outs[-1], net._forward(x))
        contiguous = torch.randn(1, 3, 64, 64)
        net(contiguous), net(contiguous), net(contiguous)
    assert replays[0] == len(sizes) + 1
    kept = frozen_plan.plans(net)
    assert len(kept) == frozen_cpu.MAX_PACKED_SHAPES
    assert [key[0][2] for key in kept] == [48, 56, 64, 64]


def _live_peak(run):
    """The most tensors made by ops during run() alive at once."""
    alive, peak = [], [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    alive.append(weakref.ref(o))
            peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
            return out

    with Count():
        out = run()
    return out, peak[0], sum(ref() is not None for ref in alive)


@pytest.mark.parametrize("builder", ["resnet18", "densenet121"])
def test_replay_releases_each_intermediate_after_its_last_use(builder, replays):
    net, x = make(builder)
    with torch.no_grad():
        warm(net, x)
        out, replay_peak, replay_left = _live_peak(lambda: net(x))
        assert replays[0] == 1
        del out
        _, plain_peak, _ = _live_peak(lambda: net._forward(x))
    assert replay_peak <= plain_peak and replay_left <= 1


class _ReadsItsOutput(models.resnet.ResNet):
    def _forward(self, x):
        out = super()._forward(x)
        return out * 2 if out.sum().item() > 0 else out


class _CountsCalls(models.resnet.ResNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros(()))

    def _forward(self, x):
        self.calls.add_(1)
        return super()._forward(x)


@pytest.mark.parametrize("cls", [_ReadsItsOutput, _CountsCalls])
def test_a_forward_that_reads_tensor_data_or_writes_its_state_is_not_recorded(cls, replays):
    torch.manual_seed(0)
    net = cls(models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    net = freeze(net.eval().to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        outs = [net(x) for _ in range(2)] + [net(-x) for _ in range(3)]
        wants = [net._forward(x)] * 2 + [net._forward(-x)] * 3
    assert replays[0] == 0
    assert set(frozen_plan.plans(net).values()) == {"unplannable"}
    if cls is _CountsCalls:
        assert net.calls.item() == 5 + 2  # each call of net and of _forward counted
        return
    for got, want in zip(outs, wants):
        assert torch.equal(got, want)


def test_copies_pickles_unfreeze_and_freeze_start_without_plans(replays):
    net, x = make()
    with torch.no_grad():
        warm(net, x)
        want = net(x)
        for other in copies(net):
            assert len(frozen_plan.plans(other)) == 0
            assert all(torch.equal(other(x), want) for _ in range(3))
        assert replays[0] == 3
        unfreeze(net)
        assert frozen_plan.plans(net) == {}
        assert all(torch.equal(net(x), net._forward(x)) for _ in range(3))
        assert replays[0] == 3 and frozen_plan.plans(net) == {}
        freeze(net)
        assert len(frozen_plan.plans(net)) == 0
        assert all(torch.equal(net(x), want) for _ in range(3)) and replays[0] == 4


def test_recording_imports_no_torch_compile_machinery():
    """torch wraps a dispatch mode's handler in torch._dynamo.disable by default, and the
    first wrapped call imports torch._dynamo: 2.5 s added to a frozen model's second call."""
    code = """if True:
        import sys, time, torch
        from cnnkernels import models
        from cnnkernels.nn import freeze, frozen_plan
        net = freeze(models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last))
        x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            net(x), net(x)
        assert isinstance(next(iter(frozen_plan.plans(net).values())), frozen_plan._Plan)
        print("torch._dynamo" in sys.modules)
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
