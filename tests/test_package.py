"""The package as a user imports it: `import cnnkernels` gives models, analysis and eval
(imported on first use) from an install and from a bare source checkout alike, and
`python -m cnnkernels.info` covers every registered op."""
import pathlib
import site
import subprocess
import sys

import pytest

import cnnkernels
from cnnkernels import _backends, info

ROOT = pathlib.Path(__file__).resolve().parent.parent
USAGE = ("import cnnkernels\n"
         "net = cnnkernels.models.resnext50(num_classes=3)\n"
         "import cnnkernels.models.resnet as resnet\n"
         "assert isinstance(net, resnet.ResNet)\n"
         "print(cnnkernels.models.__name__, cnnkernels.analysis.__name__, cnnkernels.eval.__name__)\n")


def test_lazy_subpackages_from_this_environment():
    result = subprocess.run([sys.executable, "-c", USAGE], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cnnkernels.models", "cnnkernels.analysis", "cnnkernels.eval"]


def test_lazy_subpackages_from_a_source_checkout_without_install():
    """-S skips site's .pth files, so an editable install's import hooks are absent: only the
    source tree and the site-packages folder (for torch) are on the path."""
    paths = [str(ROOT)] + site.getsitepackages()
    script = f"import sys; sys.path[:0] = {paths!r}\n" + USAGE
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "cnnkernels.models" in result.stdout


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'modelz'"):
        cnnkernels.modelz


def test_info_covers_every_registered_op():
    public = {name for name in _backends._registry if not name.endswith("_backward")}
    assert public >= {"conv_bn_act", "add_act", "se_excite", "bn_act_conv", "bn_act_conv_into"}
    assert set(info._sample_inputs("cpu")) == public
    report = info.report()
    for name in public:
        assert f"\n{name} on cpu float32 tensors:" in report
