"""The one table of benchmarked architectures: for each cnnkernels.models name, how to
build our model and the baseline it is measured against.

The baseline of a name is the torchvision model of the same architecture
(``torchvision.models.<twin>``) holding the very same weights: our state_dict is
loaded into it with ``strict=True``, so every key must match. SE-ResNet and
SE-ResNeXt, which torchvision lacks, are measured against torchvision's ResNet built
with a plain-torch SE gate in each bottleneck (bench/plain_senet.py: timm's SEModule
keys, so our weights load strict). Any other architecture torchvision lacks is measured
against our own model run unfused: the same module with every cnnkernels op forced onto
the "reference" backend, which composes plain torch ops (conv2d, batch_norm, relu, ...)
for each fused op. Under torch.compile (and for OpenVINO, which cannot convert them)
those reference ops stay opaque custom ops, so that baseline is weaker than a plain twin;
the report says so.

New models plug in by adding a line to TABLE (or calling register()); a zoo name not
in TABLE falls back to the torchvision model of the same name when there is one, and
to the unfused reference baseline otherwise.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

REFERENCE_BACKEND = "reference"


def models_module():
    """cnnkernels.models (installed, or from the models/ folder of a source checkout)."""
    return importlib.import_module("cnnkernels.models")


def zoo_models() -> list[str]:
    """Names cnnkernels.models.create_model() accepts (empty when the zoo has none)."""
    return list(models_module().list_models())


BaselineBuilder = Callable[[Mapping[str, torch.Tensor], int], nn.Module]
OursBuilder = Callable[[int], nn.Module]


@dataclass(frozen=True)
class Architecture:
    """One benchmarked architecture.

    name: the cnnkernels.models name (what --models takes).
    baseline_label: what the baseline is, in words, for the table, JSON and chart.
    build_baseline(ours_state_dict, num_classes) -> nn.Module: a fresh baseline module
        whose state_dict keys equal ours (the harness loads our weights into it,
        strict). It may read our keys to pick options (e.g. auxiliary classifiers).
    baseline_backend: a cnnkernels backend forced while the baseline runs (None: the
        default choice; "reference" for the unfused-twin baselines).
    note: a caveat printed with the results.
    build_ours(num_classes) -> nn.Module: our model; None means
        cnnkernels.models.create_model(name, num_classes=num_classes).
    """
    name: str
    baseline_label: str
    build_baseline: BaselineBuilder
    baseline_backend: str | None = None
    note: str = ""
    build_ours: OursBuilder | None = None

    def ours(self, num_classes: int) -> nn.Module:
        """A fresh model of ours with num_classes outputs."""
        if self.build_ours is not None:
            return self.build_ours(num_classes)
        return models_module().create_model(self.name, num_classes=num_classes)


def _torchvision(twin: str, options: Callable[[Mapping[str, torch.Tensor]], dict] | None = None) -> BaselineBuilder:
    """A builder of torchvision.models.<twin>(weights=None, num_classes=..., **options(our keys))."""
    def build(ours_state: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
        import torchvision

        kwargs = options(ours_state) if options is not None else {}
        return getattr(torchvision.models, twin)(weights=None, num_classes=num_classes, **kwargs)
    return build


def _googlenet_options(ours_state: Mapping[str, torch.Tensor]) -> dict:
    """torchvision GoogLeNet's switches matching our keys: auxiliary heads if we have
    them; no input transform; no weight init (our weights replace it)."""
    return {"aux_logits": any(key.startswith("aux1.") for key in ours_state),
            "transform_input": False, "init_weights": False}


def _inception_options(ours_state: Mapping[str, torch.Tensor]) -> dict:
    """torchvision Inception3's switches matching our keys (see _googlenet_options)."""
    return {"aux_logits": any(key.startswith("AuxLogits.") for key in ours_state),
            "transform_input": False, "init_weights": False}


def _unfused_twin(name: str) -> BaselineBuilder:
    """Our own model of `name`, to be run with the reference backend forced."""
    def build(ours_state: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
        return models_module().create_model(name, num_classes=num_classes)
    return build


def _plain_senet(name: str) -> BaselineBuilder:
    """torchvision's ResNet with our model's depth, groups and width and a plain-torch SE
    gate in every bottleneck (cnnkernels/bench/plain_senet.py)."""
    def build(ours_state: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
        from cnnkernels.bench import plain_senet

        return plain_senet.like(models_module().create_model(name, num_classes=num_classes))
    return build


_UNFUSED_NOTE = ("no torchvision twin: its baseline is the same cnnkernels model run unfused "
                 "(every fused op forced onto the 'reference' backend, plain torch ops); under "
                 "torch.compile those ops stay opaque, so the compiled baseline fuses less than a "
                 "torchvision twin would")


def _same_name(name: str) -> Architecture:
    return Architecture(name, f"torchvision.models.{name}", _torchvision(name))


def _unfused(name: str) -> Architecture:
    return Architecture(name, f"cnnkernels {name}, reference backend (unfused)", _unfused_twin(name),
                        baseline_backend=REFERENCE_BACKEND, note=_UNFUSED_NOTE)


TABLE: dict[str, Architecture] = {
    **{name: _same_name(name) for name in (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
        "densenet121", "densenet161", "densenet169", "densenet201",
        "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "alexnet")},
    "resnext50": Architecture("resnext50", "torchvision.models.resnext50_32x4d", _torchvision("resnext50_32x4d")),
    "googlenet": Architecture("googlenet", "torchvision.models.googlenet", _torchvision("googlenet", _googlenet_options)),
    "inception_v3": Architecture("inception_v3", "torchvision.models.inception_v3",
                                 _torchvision("inception_v3", _inception_options)),
    **{name: Architecture(name, "torchvision ResNet with plain-torch SE gates (timm's SEModule)",
                          _plain_senet(name))
       for name in ("se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50", "se_resnext50_32x4d",
                    "se_resnext101_32x4d")},
}


def register(architecture: Architecture) -> None:
    """Adds (or replaces) an architecture in TABLE, e.g. a model outside the zoo with
    its own build_ours."""
    TABLE[architecture.name] = architecture


def known_models() -> list[str]:
    """Every name --models accepts: zoo models, plus table entries that build their own model."""
    names = {name for name, arch in TABLE.items() if arch.build_ours is not None}
    try:
        names.update(zoo_models())
    except ModuleNotFoundError:
        pass
    return sorted(names)


def architecture(name: str) -> Architecture:
    """The Architecture of `name`: its TABLE entry, else (for a zoo model) the torchvision
    model of the same name, else the unfused reference twin. ValueError naming the
    known models for an unknown name."""
    known = known_models()
    if name not in known:
        listing = ", ".join(known) if known else "none (cnnkernels.models has no models yet)"
        raise ValueError(f"unknown model {name!r}; known: {listing}")
    if name in TABLE:
        return TABLE[name]
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return _same_name(name)
    return _unfused(name)
