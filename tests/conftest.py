import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _alias_models_package():
    """`models/` is installed as cnnkernels.models; when the tests run against the
    source tree without an install, import it from the folder under that name."""
    import importlib.util
    import pathlib
    import sys

    import cnnkernels

    if "cnnkernels.models" in sys.modules:
        return
    try:
        importlib.import_module("cnnkernels.models")
        return
    except ModuleNotFoundError:
        pass
    folder = pathlib.Path(__file__).resolve().parent.parent / "models"
    spec = importlib.util.spec_from_file_location("cnnkernels.models", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cnnkernels.models"] = module
    spec.loader.exec_module(module)
    cnnkernels.models = module


import importlib  # noqa: E402

_alias_models_package()
