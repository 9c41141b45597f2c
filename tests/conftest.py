import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import global_state

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


@pytest.fixture(autouse=True)
def _restores_global_state(request):
    """Every test leaves the global settings as it found them (TF32, default dtype,
    deterministic mode, the forced backend, ...): a test that changes one must restore it."""
    before = global_state()
    yield
    after = global_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        pytest.fail(f"{request.node.nodeid} left global state changed (before, after): {changed}", pytrace=False)
