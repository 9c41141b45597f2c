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


def _run_without_extension(script: str) -> str:
    """The stripped stdout of `python -c script`, no backend forced (the script hides cnnkernels._C)."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "CNNKERNELS_BACKEND": ""})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


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
    assert _run_without_extension(script) == "reference"


def test_python_autograd_of_conv_bn_act_serves_without_extension():
    """Without _C, conv_bn_act's autograd is the Python one (with _C it is compiled,
    csrc/autograd/conv_bn_act.cpp): its gradients equal plain torch's, float64."""
    script = (
        "import sys\n"
        "sys.modules['cnnkernels._C'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, torch.nn.functional as F, cnnkernels\n"
        "torch.manual_seed(0)\n"
        "t = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in\n"
        "     ((2, 3, 5, 5), (4, 3, 3, 3), (4,), (4,), (4,), (2, 4, 5, 5))]\n"
        "x, w, b, g, beta, res = t\n"
        "out = cnnkernels.ops.conv_bn_act(x, w, b, g, beta, padding=1, training=True, residual=res)\n"
        "grads = torch.autograd.grad(out, t, out.detach().cos())\n"
        "want = F.relu(F.batch_norm(F.conv2d(x, w, b, padding=1), None, None, g, beta, True) + res)\n"
        "expected = torch.autograd.grad(want, t, want.detach().cos())\n"
        "print(max((a - e).abs().max().item() for a, e in zip(grads, expected)))\n"
    )
    assert float(_run_without_extension(script)) < 1e-10


def test_conv_bn_act_autograd_is_compiled_with_the_extension():
    from cnnkernels import _library
    if not _library.extension_loaded():
        skip_or_fail(f"cnnkernels._C is not built here: {_library.LOAD_ERROR}")
    assert _library.has_native_kernel("conv_bn_act", "Autograd")


def test_fallback_schemas_match_the_extension():
    from cnnkernels import _library
    if not _library.extension_loaded():
        skip_or_fail(f"cnnkernels._C is not built here: {_library.LOAD_ERROR}")
    for name, schema in _library.PUBLIC_SCHEMAS.items():
        registered = getattr(torch.ops.cnnkernels, name).default._schema
        assert str(registered) == str(torch._C.parse_schema(f"cnnkernels::{name}{schema}"))
