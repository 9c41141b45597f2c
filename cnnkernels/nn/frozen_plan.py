"""A frozen model's CPU forward recorded once per input signature and replayed op by op.

On the frozen CPU path (frozen_cpu.py) the kernels run prepacked, but each call still
walks the model in Python: module calls, the frozen-path checks, cache keys, argument
lists. At batch 1 that is a few milliseconds per ResNet-50 forward (2 threads, AVX2:
about 4 of 57 ms), as much as the gap to OpenVINO. `run(model, x, forward)`, called by a
cnnkernels model's forward, removes it:

- the first call for an input signature runs forward(x) as it is (it folds and packs the
  weights into freeze's caches);
- the second runs it under a TorchDispatchMode that records every op the dispatcher
  sees (below autograd and autocast: the ops that actually run, casts included) with its
  arguments, each tensor named as the call's input, an earlier op's output (a slot) or a
  constant (a parameter, a packed weight);
- later calls replay that list: the same ops with the same arguments on this call's
  tensors, each intermediate released after its last use, so the result is the
  unreplayed call's bit for bit. Where the compiled extension is loaded the list runs in
  C++ (cnnkernels._C.ReplayPlan, csrc/plan_replay.cpp: each op called boxed through the
  dispatcher with its arguments converted once, the GIL released), about 3 % of a
  batch-1 ResNet-50 forward and 6 % of a GoogLeNet one faster than the Python loop
  (2 threads, AVX2 EPYC); otherwise, or for a step it cannot take, in Python.

Signature: the input's shape, strides and dtype, CPU autocast (on, dtype), inference
mode, whether oneDNN is enabled. A plan is replayed only while the model is in the state
it was recorded in, checked on every call: every module the same object in the same
place, in eval mode, frozen as it was, with no forward hook or pre-hook (nor a global
one); every parameter and buffer the same tensor with the same storage and version
counter (as freeze's caches are keyed), none wanting a gradient while grad mode is on;
the modules' plain attributes (eps, stride, padding, ...) unchanged. Anything else, and
the call runs forward(x) unreplayed (recording again on the next call). In-place edits
through `.data` escape version counters: unfreeze or freeze the model after them, as for
freeze's caches.

Not recorded (the signature then always runs unreplayed): an op whose output shape or
value depends on tensor data read by Python (.item(), nonzero), an op returning a
non-tensor, an op writing into a constant (a module updating its own buffers), a forward
not returning a tensor made during the call. At most frozen_cpu.MAX_PACKED_SHAPES
signatures are kept per model, oldest dropped first; freeze, unfreeze, deepcopy and
pickling drop them.
"""
from __future__ import annotations

import itertools
import operator
import sys
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cnnkernels import _library
from cnnkernels.nn import frozen_cpu

__all__ = ["run", "enable", "plans", "ReplaysFrozenForward", "PLANS_ATTR", "REPLAYS_ATTR"]

PLANS_ATTR = "_cnnkernels_forward_plans"
REPLAYS_ATTR = "replays_frozen_forward"  # a class attribute: its forward calls run(), freeze enables it
_FROZEN_ATTR = "_cnnkernels_freeze"  # freeze.py's mark (not imported: freeze imports this module)
_UNPLANNABLE = "unplannable"
_PLAIN = (int, float, bool, str, tuple, type(None))
_VERSION = operator.attrgetter("_version")
NATIVE_REPLAY = True  # plans made from now on replay in C++ (cnnkernels._C.ReplayPlan) where they can


class _Plans(OrderedDict):
    """A model's plans by signature, oldest first; a copied or pickled model starts with
    none (its constants are the original's packed weights)."""

    def __deepcopy__(self, memo):
        return _Plans()

    def __reduce__(self):
        return _Plans, ()


class ReplaysFrozenForward:
    """Mixin of a model class (before nn.Module in its bases) whose forward is written as
    `_forward(x)`: its forward(x) goes through run(), so that once frozen by
    cnnkernels.nn.freeze its CPU forward is replayed from a recorded plan from the third
    call of an input signature on. Every cnnkernels.models architecture uses it."""

    replays_frozen_forward = True  # REPLAYS_ATTR: freeze() gives the model a plan store

    def forward(self, x):
        """self._forward(x), replayed from a plan where one is valid (module docstring)."""
        return run(self, x, self._forward)


def enable(model: nn.Module) -> None:
    """Gives model (frozen by cnnkernels.nn.freeze) an empty plan store: run() records and
    replays only for a model that has one."""
    model.__dict__[PLANS_ATTR] = _Plans()


def plans(model: nn.Module) -> dict:
    """{signature: _Plan, a count of calls seen, or "unplannable"} of model (empty if none)."""
    return model.__dict__.get(PLANS_ATTR, {})


def _signature(x: torch.Tensor) -> tuple:
    autocast = torch.is_autocast_enabled("cpu")
    return (tuple(x.shape), x.stride(), x.dtype, autocast, torch.get_autocast_dtype("cpu") if autocast else None,
            torch.is_inference_mode_enabled(), torch.backends.mkldnn.enabled)


def run(model: nn.Module, x, forward):
    """forward(x), replayed from model's recorded plan for x's signature where one is valid
    (module docstring); x a CPU tensor of a model marked by cnnkernels.nn.freeze."""
    store = model.__dict__.get(PLANS_ATTR)
    if (store is None or type(x) is not torch.Tensor or x.device.type != "cpu" or model.training
            or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()):
        return forward(x)
    key = _signature(x)
    entry = store.get(key)
    if isinstance(entry, _Plan):
        if entry.valid():
            return entry.replay(x)
        entry = 0
    if entry == _UNPLANNABLE:
        return forward(x)
    if entry is None or entry == 0:
        store[key] = 1
        while len(store) > frozen_cpu.MAX_PACKED_SHAPES:
            store.popitem(last=False)
        return forward(x)
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return forward(x)  # recorded later, when a call wants no gradient
    if any(t.is_inference() for t in (*model.parameters(), *model.buffers())):
        store[key] = _UNPLANNABLE  # no version counters to check
        return forward(x)
    state = _State(model)
    if state.training or not state.valid():
        store[key] = 0
        return forward(x)
    recorder = _Recorder(x)
    with recorder:
        out = forward(x)
    store[key] = recorder.plan(out, state) or _UNPLANNABLE
    return out


class _State:
    """What a plan's validity depends on (module docstring), captured at recording. It
    holds the modules and tensors it saw, so no id it compares can be reused. Every check
    is a flat pass (DenseNet-121: about 900 module tables and 730 tensors per call)."""

    def __init__(self, model: nn.Module):
        modules = list(model.modules())
        self.training = any(m.training for m in modules)
        self.hooks = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.frozen = [m.__dict__ for m in modules if _FROZEN_ATTR in m.__dict__]
        self.tables = [t for m in modules for t in (m._modules, m._parameters, m._buffers) if t]
        self.lengths = list(map(len, self.tables))
        self.contents = [v for t in self.tables for v in t.values()]
        self.ids = self._ids()
        self.getters, self.dicts = [], []
        for m in modules:
            keys = [k for k, v in m.__dict__.items() if not k.startswith("_") and type(v) in _PLAIN]
            if keys:
                self.getters.append(operator.itemgetter(*keys))
                self.dicts.append(m.__dict__)
        self.values = self._values()
        self.tensors = list({id(v): v for v in self.contents if isinstance(v, torch.Tensor)}.values())
        self.versions = self._versions()
        self.pointers = self._pointers()

    def _ids(self):
        return list(map(id, itertools.chain.from_iterable(map(dict.values, self.tables))))

    def _values(self):
        return list(map(operator.call, self.getters, self.dicts))

    def _versions(self):
        return list(map(_VERSION, self.tensors))

    def _pointers(self):
        return list(map(torch.Tensor.data_ptr, self.tensors))

    def valid(self) -> bool:
        module = nn.modules.module
        if module._global_forward_hooks or module._global_forward_pre_hooks or any(self.hooks):
            return False
        if not all(_FROZEN_ATTR in d for d in self.frozen):
            return False
        if list(map(len, self.tables)) != self.lengths:
            return False
        if self._ids() != self.ids or self._values() != self.values:
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors):
            return False
        return self._versions() == self.versions and self._pointers() == self.pointers


class _Unplannable(Exception):
    pass


class _Recorder(TorchDispatchMode):
    """Records the ops of one call: per op its function, its arguments as templates
    (("slot", i), ("const", value) or ("list", type, [templates])) and its output slots."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless this says
        # no; the first such call imports torch._dynamo (2.5 s). run() never records under
        # torch.compile, so there is nothing to disable.
        return False

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.slots = {id(x): 0}
        self.alive = [x]  # keeps every recorded tensor alive, so no id is reused
        self.steps = []
        self.failed = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.failed is None:
            try:
                self._record(func, args, kwargs, out)
            except _Unplannable as reason:
                self.failed = str(reason)
        return out

    def _template(self, value):
        if isinstance(value, torch.Tensor):
            slot = self.slots.get(id(value))
            return ("slot", slot) if slot is not None else ("const", value)
        if _holds_tensor(value):
            templates = [self._template(v) for v in value]
            if any(_reads_slot(t) for t in templates):
                return ("list", type(value), templates)
        return ("const", value)

    def _record(self, func, args, kwargs, out):
        if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
            raise _Unplannable(f"{func} depends on tensor data")
        templates = [self._template(a) for a in args]
        kw_templates = {k: self._template(v) for k, v in kwargs.items()}
        schema_args = func._schema.arguments
        for i, argument in enumerate(schema_args):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if not written:
                continue
            template = templates[i] if i < len(templates) else kw_templates.get(argument.name)
            if template is not None and _reads_constant(template):
                raise _Unplannable(f"{func} writes into a tensor not made during the call")
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if not all(o is None or isinstance(o, torch.Tensor) for o in outputs):
            raise _Unplannable(f"{func} returns a non-tensor")
        all_templates = [*templates, *kw_templates.values()]
        if any(_reads_tensor(t) for t in all_templates) and not any(_reads_slot(t) for t in all_templates) \
                and torch.Tag.nondeterministic_seeded not in func.tags:
            return  # a function of constants only (a view of a weight): its outputs stay constants
        out_slots = []
        for o in outputs:
            if o is None:
                out_slots.append(None)
                continue
            if id(o) not in self.slots:
                self.slots[id(o)] = len(self.alive)
                self.alive.append(o)
            out_slots.append(self.slots[id(o)])
        self.steps.append((func, templates, kw_templates, out_slots, isinstance(out, (tuple, list))))

    def plan(self, out, state: _State):
        if self.failed is not None or type(out) is not torch.Tensor or id(out) not in self.slots:
            return None
        return _Plan(self.steps, len(self.alive), self.slots[id(out)], state)


def _reads_slot(template) -> bool:
    kind = template[0]
    return kind == "slot" or (kind == "list" and any(_reads_slot(t) for t in template[2]))


def _holds_tensor(value) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)


def _reads_tensor(template) -> bool:
    kind = template[0]
    if kind == "list":
        return any(_reads_tensor(t) for t in template[2])
    return kind == "slot" or isinstance(template[1], torch.Tensor) or _holds_tensor(template[1])


def _reads_constant(template) -> bool:
    kind = template[0]
    if kind == "list":
        return any(_reads_constant(t) for t in template[2])
    return kind == "const" and (isinstance(template[1], torch.Tensor) or _holds_tensor(template[1]))


def _build(template, slots):
    kind = template[0]
    if kind == "slot":
        return slots[template[1]]
    if kind == "const":
        return template[1]
    return template[1](_build(t, slots) for t in template[2])


class _Plan:
    """The recorded ops of one call, ready to replay: per step the op, its constant
    arguments with the slot arguments to fill in, where its outputs go and which slots
    are read for the last time by it."""

    def __init__(self, steps, n_slots: int, out_slot: int, state: _State):
        self.state = state
        self.n_slots = n_slots
        self.out_slot = out_slot
        last_use = {}
        for index, (_, templates, kw_templates, out_slots, _) in enumerate(steps):
            for slot in _slots_of([*templates, *kw_templates.values()]):
                last_use[slot] = index
            for slot in out_slots:  # steps run in order: a slot's latest step is its last use
                if slot is not None:
                    last_use[slot] = index
        released = [[] for _ in steps]
        for slot, index in last_use.items():
            if slot not in (0, out_slot):
                released[index].append(slot)
        self.native = _native_plan(steps, n_slots, out_slot, released) if NATIVE_REPLAY else None
        self.steps = []
        for index, (func, templates, kw_templates, out_slots, multiple) in enumerate(steps):
            constants = [t[1] if t[0] == "const" else None for t in templates]
            filled = [(i, t[1]) for i, t in enumerate(templates) if t[0] == "slot"]
            nested = [(i, t) for i, t in enumerate(templates) if t[0] == "list"]
            self.steps.append((getattr(func, "_op", func), constants, filled, nested, kw_templates, out_slots, multiple,
                               released[index]))

    def valid(self) -> bool:
        return self.state.valid()

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self._replay(x)
        return self._replay(x)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.run(x)
        slots = [None] * self.n_slots
        slots[0] = x
        for op, constants, filled, nested, kwargs, out_slots, multiple, released in self.steps:
            args = constants.copy()
            for i, slot in filled:
                args[i] = slots[slot]
            for i, template in nested:
                args[i] = _build(template, slots)
            if kwargs:
                out = op(*args, **{k: _build(t, slots) for k, t in kwargs.items()})
            else:
                out = op(*args)
            if multiple:
                for slot, value in zip(out_slots, out):
                    if slot is not None:
                        slots[slot] = value
            elif out_slots[0] is not None:
                slots[out_slots[0]] = out
            for slot in released:
                slots[slot] = None
        return slots[self.out_slot]


_CONSTANT, _SLOT, _TENSOR_LIST, _DEFAULT = range(4)  # csrc/plan_replay.cpp's ArgKind


def _native_plan(steps, n_slots: int, out_slot: int, released: list):
    """The recorded steps as a cnnkernels._C.ReplayPlan (the same ops called boxed from C++,
    arguments converted once), or None where the extension lacks it or a step has an
    argument other than a constant, a slot, a list of tensors or a schema default."""
    native = sys.modules.get("cnnkernels._C") if _library.extension_loaded() else None
    replay_plan = getattr(native, "ReplayPlan", None)
    if replay_plan is None:
        return None
    plan = replay_plan(n_slots, out_slot)
    for (func, templates, kw_templates, out_slots, multiple), last_reads in zip(steps, released):
        if not isinstance(func, torch._ops.OpOverload):
            return None
        arguments = func._schema.arguments
        if len(templates) > len(arguments) or not set(kw_templates) <= {a.name for a in arguments}:
            return None
        kinds, values = [], []
        for index, argument in enumerate(arguments):
            template = templates[index] if index < len(templates) else kw_templates.get(argument.name)
            kind, value = _native_argument(template, argument)
            if kind is None:
                return None
            kinds.append(kind)
            values.append(value)
        try:
            plan.add_step(func._schema.name, func._schema.overload_name, kinds, values,
                          [-1 if slot is None else slot for slot in out_slots], multiple, last_reads)
        except (RuntimeError, TypeError, ValueError):  # a constant torch cannot convert to the schema's type
            return None
    return plan


def _native_argument(template, argument) -> tuple:
    if template is None:
        return (_DEFAULT, None) if argument.has_default_value() else (None, None)
    kind = template[0]
    if kind == "const":
        return _CONSTANT, template[1]
    if kind == "slot":
        return _SLOT, template[1]
    is_tensor_list = (isinstance(argument.type, torch.ListType)
                      and argument.type.getElementType() == torch.TensorType.get())
    elements = []
    for element in template[2]:
        if element[0] == "slot":
            elements.append(element[1])
        elif element[0] == "const" and isinstance(element[1], torch.Tensor):
            elements.append(element[1])
        else:
            return None, None
    return (_TENSOR_LIST, elements) if is_tensor_list else (None, None)


def _slots_of(templates):
    for t in templates:
        if t[0] == "slot":
            yield t[1]
        elif t[0] == "list":
            yield from _slots_of(t[2])
