import pytest
import torch
from hypothesis import HealthCheck, settings

_HYPOTHESIS = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])
settings.register_profile("cnnkernels", derandomize=True, **_HYPOTHESIS)  # make test: fixed examples
settings.register_profile("thorough", max_examples=500, **_HYPOTHESIS)    # --hypothesis-profile thorough


def pytest_configure(config):
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("cnnkernels")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
