"""cnnkernels: fused convolution kernels (reference, C++ CPU, Triton, CUDA backends) for
classic convolutional networks, as registered torch ops with autograd and fake tensors.

    import cnnkernels
    y = cnnkernels.ops.conv_bn_act(x, w, bn_weight=g, bn_bias=b, running_mean=m, running_var=v)
    with cnnkernels.use_backend("reference"): ...

    net = cnnkernels.models.resnext50()             # analysis and eval import on first use

`python -m cnnkernels.info` tells which backends can run each op on this machine.
"""
import importlib
import importlib.abc
import importlib.util
import pathlib
import sys

from cnnkernels import _library  # loads _C (or warns once and defines the schemas)
from cnnkernels._backends import BACKENDS, BackendError, use_backend
from cnnkernels import ops, nn

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendError", "use_backend", "ops", "nn", "models", "analysis", "eval", "__version__"]
_LAZY = ("analysis", "eval")


class _SourceTreeModels(importlib.abc.MetaPathFinder):
    """cnnkernels.models lives in the top-level models/ folder; an install maps it into the
    package (setuptools package-dir). In a source checkout that was not installed, this
    finder, consulted after every other, finds it there."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "cnnkernels.models":
            return None
        folder = pathlib.Path(__file__).resolve().parent.parent / "models"
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not any(isinstance(finder, _SourceTreeModels) for finder in sys.meta_path):
    sys.meta_path.append(_SourceTreeModels())

from cnnkernels import models  # noqa: E402  (its families register their nn.convert rules)


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"cnnkernels.{name}")
    raise AttributeError(f"module 'cnnkernels' has no attribute {name!r}")
