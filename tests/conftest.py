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


def _global_state() -> dict:
    """The process-wide settings a test could change and forget to restore."""
    import os

    from cnnkernels import _backends
    return {
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
        "cudnn flags": (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
                        torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled),
        "matmul TF32": (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()),
        "forced backend": (_backends.forced_backend(), os.environ.get("CNNKERNELS_BACKEND")),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")),
    }


@pytest.fixture(autouse=True)
def _restores_global_state(request):
    """Every test leaves the global settings as it found them (TF32, default dtype,
    deterministic mode, the forced backend, ...): a test that changes one must restore it."""
    before = _global_state()
    yield
    after = _global_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        pytest.fail(f"{request.node.nodeid} left global state changed (before, after): {changed}", pytrace=False)
