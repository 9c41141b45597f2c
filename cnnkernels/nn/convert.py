"""convert(model): swaps the recognised Conv-BN(-ReLU) structures of an existing
torchvision or timm model for fused modules, in place, keeping its state_dict.

The work is a table of rules (RULES), tried in order on every module, parents before
children. A rule is (name, match, replace): `match(module)` says whether the module has
exactly the structure the rule knows; `replace(module)` returns the fused module built
from the same submodules (shared, not copied), so parameters, buffers and state_dict
keys do not change and the outputs stay the same; each new wrapper takes the training
flag of the module it replaces, and the shared children keep theirs (a frozen BN stays
in eval mode). Every module is tried once per call. A replacement is not looked into
when its class sets `cnnkernels_fused = True` (every conv in it already runs fused);
otherwise its children are converted in turn. Modules no rule matches are left as they
are and their children are visited. The model families add their rules with
register_rule() when they are imported (models/resnet_convert.py: torchvision and timm
ResNets and their blocks; `import cnnkernels` imports the models), so nn knows no model.

Rules defined here:
  basic_conv2d           torchvision Inception / GoogLeNet BasicConv2d -> ConvBNAct
  sequential_conv_bn     nn.Sequential (or a subclass keeping its forward) holding a
                         Conv2d followed by BatchNorm2d -> FusedSequential
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cnnkernels.nn.conv_bn_act import ConvBNAct
from cnnkernels.nn import frozen_cpu
from cnnkernels.nn.freeze import is_frozen
from cnnkernels.nn.functional import assemble, conv_bn_act_modules


@dataclass(frozen=True)
class Rule:
    """One conversion: `match(module) -> bool` recognises an exact structure,
    `replace(module) -> nn.Module` builds the fused module from the same submodules."""
    name: str
    match: Callable[[nn.Module], bool]
    replace: Callable[[nn.Module], nn.Module]


RULES: list[Rule] = []


def register_rule(rule: Rule, first: bool = False) -> Rule:
    """Adds `rule` to the table (at the front when `first`, so it wins over the built-in
    rules); a rule of the same name is replaced. Returns the rule."""
    RULES[:] = [r for r in RULES if r.name != rule.name]
    RULES.insert(0, rule) if first else RULES.append(rule)
    return rule


def convert(model: nn.Module, rules: list[Rule] | None = None) -> nn.Module:
    """Replaces, inside `model`, every module a rule recognises by its fused twin.

    Children are replaced in place inside their parents. Use the return value: when
    `model` itself is recognised (a torchvision ResNet, a bare block, a Sequential) a
    new module sharing its submodules is returned. The returned module's `converted`
    attribute maps each replaced module's qualified name ("" for the root) to the rule
    that replaced it, added to those of earlier calls; a second call converts nothing.
    The state_dict (keys, tensors) is unchanged, and so are the outputs, in train and
    eval mode, running statistics included.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    walk = _Walk(RULES if rules is None else rules)
    root = walk.replace(model, "")
    if not _is_fused(root):
        walk.children(root, "")
    root.converted = {**getattr(model, "converted", {}), **walk.report}
    return root


def _is_fused(module: nn.Module) -> bool:
    return isinstance(module, ConvBNAct) or bool(getattr(type(module), "cnnkernels_fused", False))


class _Walk:
    """One convert() pass: parents before children, every module tried against the rules
    at most once (so a replacement that wraps the original is not matched again)."""

    def __init__(self, rules: list[Rule]):
        self.rules, self.report, self.seen = rules, {}, set()

    def replace(self, module: nn.Module, name: str) -> nn.Module:
        if _is_fused(module) or id(module) in self.seen:
            return module
        self.seen.add(id(module))
        for rule in self.rules:
            if rule.match(module):
                new = rule.replace(module)
                self.seen.add(id(new))
                new.training = module.training  # the wrapper's own flag; children keep theirs
                self.report[name] = rule.name
                return new
        return module

    def children(self, module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            qualified = f"{prefix}.{name}" if prefix else name
            new = self.replace(child, qualified)
            if new is not child:
                setattr(module, name, new)
            if not _is_fused(new):
                self.children(new, qualified)


def adopt(cls: type[nn.Module], source: nn.Module, modules: dict[str, nn.Module | None],
          attributes: dict | None = None) -> nn.Module:
    """A new `cls` instance (its __init__ not run) holding the given submodules (shared,
    in the given order, None allowed) and plain attributes, with `source`'s training flag."""
    module = assemble(cls, modules, attributes)
    module.training = source.training  # its own flag only: the shared children keep theirs
    return module


# --- structure checks -----------------------------------------------------------------

def is_fusable_conv(module) -> bool:
    """A plain nn.Conv2d (not a subclass with its own forward) with integer zero padding."""
    return type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros"


def is_conv_bn_pair(conv, bn) -> bool:
    """conv is fusable and bn a plain nn.BatchNorm2d over conv's output channels."""
    return is_fusable_conv(conv) and type(bn) is nn.BatchNorm2d and bn.num_features == conv.out_channels


def is_relu(module) -> bool:
    return type(module) is nn.ReLU


def children_of(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def has_exactly(module: nn.Module, names: set[str]) -> bool:
    return set(children_of(module)) == names


def is_identity(module) -> bool:
    return module is None or type(module) is nn.Identity


def is_plain_downsample(module) -> bool:
    """None or torchvision's projection shortcut Sequential(Conv2d, BatchNorm2d)."""
    return module is None or (type(module) is nn.Sequential and len(module) == 2
                              and is_conv_bn_pair(module[0], module[1]))


def _class_of(module_name: str, class_name: str):
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None


def is_instance_of(module, module_name: str, class_name: str) -> bool:
    """type(module) is module_name.class_name, without importing a package that is not loaded yet."""
    if module_name not in sys.modules:
        return False
    cls = _class_of(module_name, class_name)
    return cls is not None and type(module) is cls


# --- BasicConv2d and Sequential runs ------------------------------------------------------

BASIC_CONV2D_CLASSES = (("torchvision.models.inception", "BasicConv2d"),
                        ("torchvision.models.googlenet", "BasicConv2d"))


def _match_basic_conv2d(module) -> bool:
    """A module computing relu(bn(conv(x))) with exactly the children conv and bn
    (torchvision's Inception v3 and GoogLeNet BasicConv2d)."""
    return (any(is_instance_of(module, m, c) for m, c in BASIC_CONV2D_CLASSES)
            and has_exactly(module, {"conv", "bn"}) and is_conv_bn_pair(module.conv, module.bn))


def _replace_basic_conv2d(module):
    return ConvBNAct.from_modules(module.conv, module.bn, activation="relu")


def _inplace(module) -> bool:
    return getattr(module, "inplace", False) is True


def fused_runs(modules: list[nn.Module]) -> list[tuple[int, int, str]]:
    """The (start, length, activation) of every Conv2d -> BatchNorm2d (-> ReLU) run in
    `modules` that FusedSequential executes as one op. A run followed by a module that
    works in place (inplace=True, e.g. ReLU6 or Dropout) is left out: the fused op keeps
    its output for the backward pass, which an in-place change would invalidate."""
    runs, i = [], 0
    while i + 1 < len(modules):
        if is_conv_bn_pair(modules[i], modules[i + 1]):
            relu = i + 2 < len(modules) and is_relu(modules[i + 2])
            length = 3 if relu else 2
            if not (i + length < len(modules) and _inplace(modules[i + length])):
                runs.append((i, length, "relu" if relu else "none"))
                i += length
                continue
        i += 1
    return runs


class FusedSequential(nn.Sequential):
    """nn.Sequential whose Conv2d -> BatchNorm2d (-> ReLU) runs each execute as one fused
    conv_bn_act op (see fused_runs); every other child runs as usual. The children and
    their indices are the Sequential's, so the state_dict keys are the same
    (features.0.weight, features.1.running_mean, ...). forward(x) gives the
    Sequential's output.
    """

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> "FusedSequential":
        """Wraps the children of `sequential` (shared) under their names; its public plain
        attributes (e.g. Conv2dNormActivation.out_channels) are kept."""
        attributes = {k: v for k, v in vars(sequential).items() if not k.startswith("_") and k != "training"}
        return adopt(cls, sequential, dict(sequential.named_children()), attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self._modules.values())
        runs = {start: (length, activation) for start, length, activation in fused_runs(modules)}
        i = 0
        frozen = False  # the last fused run's BatchNorm is frozen (cnnkernels.nn.freeze)
        while i < len(modules):
            if i in runs:
                length, activation = runs[i]
                x = conv_bn_act_modules(modules[i], modules[i + 1], x, activation=activation)
                frozen = is_frozen(modules[i + 1])
                i += length
                continue
            pooled = frozen_cpu.max_pool(modules[i], x) if frozen else None
            x = modules[i](x) if pooled is None else pooled
            i += 1
        return x


def _match_sequential(module) -> bool:
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and bool(fused_runs(list(module))))


for _rule in (
    Rule("basic_conv2d", _match_basic_conv2d, _replace_basic_conv2d),
    Rule("sequential_conv_bn", _match_sequential, FusedSequential.from_sequential),
):
    register_rule(_rule)
