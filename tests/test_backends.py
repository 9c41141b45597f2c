"""Backend selection: defaults, forcing by context manager and environment, and errors."""
import os
import subprocess
import sys

import pytest
import torch

import cnnkernels
from cnnkernels import _backends, ops
from helpers import skip_or_fail


def sample():
    return (torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), None, torch.ones(6), torch.zeros(6),
            torch.zeros(6), torch.ones(6))


def test_default_on_cpu_is_cpu_or_reference_with_reasons():
    verdict = ops.explain("conv_bn_act", *sample(), padding=1)
    assert verdict["forced"] is None
    if "cpu" in verdict["rejected"]:
        assert verdict["backend"] == "reference" and verdict["rejected"]["cpu"]
    else:
        assert verdict["backend"] == "cpu"
    assert any("needs cuda tensors" in r for r in verdict["rejected"]["cuda"])


def test_use_backend_forces_and_restores():
    with cnnkernels.use_backend("reference"):
        assert ops.explain("conv_bn_act", *sample())["backend"] == "reference"
        with cnnkernels.use_backend("triton"):
            assert _backends.forced_backend() == "triton"
        assert _backends.forced_backend() == "reference"
    assert _backends.forced_backend() is None


def test_forced_backend_that_cannot_run_raises_with_reasons():
    with cnnkernels.use_backend("cuda"), pytest.raises(cnnkernels.BackendError, match="cuda: needs cuda tensors"):
        ops.conv_bn_act(*sample())


def test_unknown_backend_name_is_rejected():
    with pytest.raises(cnnkernels.BackendError, match="unknown backend 'cudnn'"):
        with cnnkernels.use_backend("cudnn"):
            pass


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("CNNKERNELS_BACKEND", "reference")
    assert ops.explain("conv_bn_act", *sample())["backend"] == "reference"
    monkeypatch.setenv("CNNKERNELS_BACKEND", "nonsense")
    with pytest.raises(cnnkernels.BackendError, match=r"\$CNNKERNELS_BACKEND"):
        ops.conv_bn_act(*sample())


def test_info_reports_every_backend():
    result = subprocess.run([sys.executable, "-m", "cnnkernels.info"], capture_output=True, text=True, check=True)
    assert "torch " + torch.__version__ in result.stdout
    for backend in _backends.BACKENDS:
        assert f"  {backend} " in result.stdout


def test_import_without_extension_warns_and_reference_still_works(tmp_path):
    """A missing or broken _C: import works, warns once, schemas exist, reference runs."""
    script = (
        "import sys, warnings\n"
        "sys.modules['cnnkernels._C'] = None\n"  # makes `import cnnkernels._C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import cnnkernels, torch\n"
        "messages = [str(w.message) for w in caught if 'cnnkernels._C' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "x = torch.randn(2, 3, 4, 4); w = torch.randn(5, 3, 1, 1)\n"
        "out = cnnkernels.ops.conv_bn_act(x, w, training=True)\n"
        "assert out.shape == (2, 5, 4, 4)\n"
        "print(cnnkernels.ops.explain('conv_bn_act', x, w, training=True)['backend'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "CNNKERNELS_BACKEND": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


def test_fallback_schemas_match_the_extension():
    from cnnkernels import _library
    if not _library.extension_loaded():
        skip_or_fail(f"cnnkernels._C is not built here: {_library.LOAD_ERROR}")
    for name, schema in _library.PUBLIC_SCHEMAS.items():
        registered = getattr(torch.ops.cnnkernels, name).default._schema
        assert str(registered) == str(torch._C.parse_schema(f"cnnkernels::{name}{schema}"))
