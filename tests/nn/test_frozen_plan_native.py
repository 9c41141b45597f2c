"""cnnkernels._C.ReplayPlan, the C++ replay of a frozen model's recorded forward
(csrc/plan_replay.cpp, built by cnnkernels/nn/frozen_plan.py): the Python replay's results
bit for bit, the GIL released while it runs, clear errors for a malformed plan, and the
Python replay kept for any step it cannot take."""
import sys
import threading
import time

import pytest
import torch

from cnnkernels import models
from cnnkernels.nn import freeze, frozen_cpu, frozen_plan
from helpers import randomize_batchnorm, skip_or_fail

CONSTANT, SLOT, TENSOR_LIST, DEFAULT = range(4)


@pytest.fixture(autouse=True)
def replay_plan():
    if not frozen_cpu._support()[0]:
        skip_or_fail("torch has no usable oneDNN: the frozen CPU path cannot run")
    cls = getattr(sys.modules.get("cnnkernels._C"), "ReplayPlan", None)
    if cls is None:
        skip_or_fail("the compiled extension (with cnnkernels._C.ReplayPlan) is not loaded")
    return cls


def _recorded(builder="resnet18", size=32, batch=2):
    torch.manual_seed(0)
    net = getattr(models, builder)(num_classes=10)
    randomize_batchnorm(net, 0)
    net = freeze(net.eval().to(memory_format=torch.channels_last))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net(x), net(x)
    return net, x, frozen_plan.plans(net)[frozen_plan._signature(x)]


@pytest.mark.parametrize("builder", ["resnet18", "densenet121", "googlenet"])
def test_cpp_and_python_replays_agree_bit_for_bit(builder):
    """ResNet (in-place residual convolutions), DenseNet (the native block op, which returns
    nothing), GoogLeNet (concatenations: tensor lists of slots)."""
    net, x, plan = _recorded(builder)
    assert plan.native is not None and len(plan.native) == len(plan.steps)
    with torch.no_grad():
        native = net(x)
        kept, plan.native = plan.native, None
        python = net(x)
        plan.native = kept
        other = torch.randn_like(x)
        native_other, plain_other = net(other), net._forward(other)
    assert torch.equal(native, python)
    assert torch.equal(native_other, plain_other) and not torch.equal(native_other, native)


def test_the_gil_is_released_while_the_steps_run():
    net, x, plan = _recorded("resnet18", size=160, batch=4)
    ticks, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        with torch.no_grad():
            start = time.perf_counter()
            plan.native.run(x)
            end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    assert end - start > 0.005
    assert sum(start < t < end for t in ticks) >= 2


def test_a_malformed_step_is_refused_with_its_reason(replay_plan):
    plan = replay_plan(3, 2)
    relu = ("aten::relu", "")
    with pytest.raises(RuntimeError, match="slot 5 out of range"):
        plan.add_step(*relu, [SLOT], [5], [1], False, [])
    with pytest.raises(RuntimeError, match="takes 1 arguments, got 2"):
        plan.add_step(*relu, [SLOT, SLOT], [0, 0], [1], False, [])
    with pytest.raises(RuntimeError, match="returns 1 values, 2 output slots"):
        plan.add_step(*relu, [SLOT], [0], [1, 2], False, [])
    with pytest.raises(RuntimeError, match="no default"):
        plan.add_step(*relu, [DEFAULT], [None], [1], False, [])
    with pytest.raises(RuntimeError):
        plan.add_step("aten::no_such_op", "", [SLOT], [0], [1], False, [])
    with pytest.raises(RuntimeError, match="unknown argument kind"):
        plan.add_step(*relu, [7], [0], [1], False, [])
    with pytest.raises(RuntimeError, match="bad slot counts"):
        replay_plan(2, 2)
    assert len(plan) == 0


def test_a_hand_made_plan_runs_constants_slots_lists_and_defaults(replay_plan):
    """relu(x) -> 1; cat([1, constant, x]) -> 2 (dim by default); add(2, 2, alpha=2) -> 3;
    slot 1 released after the cat."""
    constant = torch.randn(2, 3)
    plan = replay_plan(4, 3)
    plan.add_step("aten::relu", "", [SLOT], [0], [1], False, [])
    plan.add_step("aten::cat", "", [TENSOR_LIST, DEFAULT], [[1, constant, 0], None], [2], False, [1])
    plan.add_step("aten::add", "Tensor", [SLOT, SLOT, CONSTANT], [2, 2, 2], [3], False, [2])
    x = torch.randn(2, 3)
    got = plan.run(x)
    assert torch.equal(got, 3 * torch.cat([x.relu(), constant, x]))
    assert len(plan) == 3


def test_a_step_it_cannot_take_keeps_the_python_replay():
    """A list argument that is not a tensor list, and a callable that is not an op."""
    schema = torch.ops.aten.sum.dim_IntList._schema
    dims = next(a for a in schema.arguments if a.name == "dim")
    assert frozen_plan._native_argument(("list", list, [("slot", 1)]), dims) == (None, None)
    add = torch.ops.aten.add.Tensor
    steps = [(add, [("slot", 0), ("slot", 0)], {}, [1], False), (lambda a: a, [("slot", 1)], {}, [2], False)]
    assert frozen_plan._native_plan(steps, 3, 2, [[], [1]]) is None
    assert frozen_plan._native_plan(steps[:1], 2, 1, [[]]) is not None
