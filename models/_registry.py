"""The model registry (timm style) and checkpoint loading.

    @register_model                              # registers under the function's name
    def resnet50(**kwargs): ...

    @register_model(aliases=("resnext50",))      # and under extra names
    def resnext50_32x4d(**kwargs): ...

    list_models("resnet*")  ->  ["resnet101", "resnet152", "resnet18", ...]
    create_model("resnet50", num_classes=10)
    load_weights(model, "resnet50-0676ba61.pth")   # a torchvision or timm checkpoint file
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import pickle
from collections import OrderedDict
from typing import Callable, Mapping

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def register_model(fn: Callable | None = None, *, name: str | None = None, aliases: tuple[str, ...] = ()):
    """Registers a model builder under `name` (default: the function's name) and under
    every alias; usable bare (@register_model) or with arguments. Returns the builder,
    wrapped so that num_classes and weights are checked before anything is built.
    Registering a name twice raises ValueError."""
    def decorate(build: Callable) -> Callable:
        builder = build if getattr(build, "checks_arguments", False) else _checking(build)
        for key in (name or build.__name__, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not builder:
                raise ValueError(f"model name {key!r} is already registered (by {_REGISTRY[key].__module__}."
                                 f"{_REGISTRY[key].__qualname__})")
            _REGISTRY[key] = builder
        return builder
    return decorate(fn) if fn is not None else decorate


def _checking(build: Callable) -> Callable:
    @functools.wraps(build)
    def builder(*args, **kwargs):
        _check_builder_arguments(build.__name__, kwargs)
        return build(*args, **kwargs)
    builder.checks_arguments = True
    return builder


def _check_builder_arguments(builder: str, kwargs: dict) -> None:
    num_classes = kwargs.get("num_classes", 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{builder}: num_classes must be a positive int, got {num_classes!r}")
    weights = kwargs.get("weights")
    if weights is not None and not isinstance(weights, (str, os.PathLike, Mapping)):
        raise TypeError(f"{builder}: weights must be a checkpoint path or a state_dict, got {type(weights).__name__}")


def with_weights(model: nn.Module, weights) -> nn.Module:
    """`model`, with the checkpoint `weights` (a file path or a state_dict) loaded strictly
    by load_weights when it is not None: every builder's last step."""
    if weights is not None:
        load_weights(model, weights)
    return model


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names (aliases included), sorted; `pattern` filters them with
    shell-style wildcards, e.g. list_models("se_*")."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def is_model(name: str) -> bool:
    """Whether create_model(name) knows the name."""
    return name in _REGISTRY


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the registered model `name`, passing the builder's keyword arguments
    (num_classes=..., weights=<checkpoint path or state_dict>, ...). An unknown name
    raises ValueError listing the close matches and every known name."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models()) or 'none'}")
    return _REGISTRY[name](**kwargs)


def extract_state_dict(checkpoint: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict inside a checkpoint: the mapping itself when it holds tensors, else
    its 'state_dict' / 'model' (/ '_ema') entry (timm and training-script checkpoints),
    with a leading 'module.' (DataParallel / DistributedDataParallel) stripped from every key."""
    state = checkpoint
    for _ in range(3):  # a checkpoint may nest once or twice: {"model": {"state_dict": ...}}
        if any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        inner = next((state[k] for k in _CHECKPOINT_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"no state_dict found in the checkpoint: its top-level keys are {sorted(checkpoint)[:20]}, "
                         f"none of which is a tensor or one of {_CHECKPOINT_KEYS}")
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = OrderedDict((k[len(prefix):], v) for k, v in state.items())
    return OrderedDict(state)


def load_weights(model: nn.Module, path_or_state_dict, strict: bool = True, map_location="cpu"):
    """Loads a torchvision or timm checkpoint (a file path or an already-loaded mapping)
    into `model` and returns load_state_dict's result (missing_keys, unexpected_keys).

    Files are read with torch.load(weights_only=True). See extract_state_dict for the
    layouts accepted (safetensors files are not read). With strict (default), missing or
    unexpected keys raise a KeyError that names them (the matching entries are loaded
    first, as with torch's strict load_state_dict), and shape mismatches raise a
    ValueError naming the parameters before anything is loaded."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {source!r} does not exist (nothing is downloaded: give a local file)")
        try:
            checkpoint = torch.load(source, map_location=map_location, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as error:
            raise ValueError(f"cannot read checkpoint {source!r} (not a file written by torch.save, or truncated): "
                             f"{type(error).__name__}: {str(error)[:200]}") from error
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"checkpoint {source!r} holds a {type(checkpoint).__name__}, not a state_dict")
    elif isinstance(path_or_state_dict, Mapping):
        checkpoint, source = path_or_state_dict, "the given state_dict"
    else:
        raise TypeError(f"path_or_state_dict must be a path or a mapping, got {type(path_or_state_dict).__name__}")
    state = extract_state_dict(checkpoint)
    own = model.state_dict()
    if strict and own and not any(k in own for k in state):
        raise KeyError(f"loading {source} into {type(model).__name__}: none of the checkpoint's {len(state)} keys "
                       f"({_shorten(list(state), 4)}) is one of the model's ({_shorten(list(own), 4)}): "
                       f"a checkpoint of another architecture?")
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"shape mismatch loading {source} into {type(model).__name__}: " + "; ".join(mismatched))
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KeyError(f"loading {source} into {type(model).__name__}: "
                       f"{len(result.missing_keys)} missing keys {_shorten(result.missing_keys)}, "
                       f"{len(result.unexpected_keys)} unexpected keys {_shorten(result.unexpected_keys)}")
    return result


def _shorten(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
