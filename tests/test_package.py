"""The package as a user imports it: `import cnnkernels` gives models (and analysis and
eval, imported on first use) from an install and from a bare source checkout alike; the
layers import only downwards; `python -m cnnkernels.info` covers every registered op."""
import ast
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


# Each layer may import only the layers listed for it (and itself): csrc -> ops -> nn ->
# models -> analysis / eval / bench. The package root composes them all.
LAYERS = {
    "cnnkernels/triton": set(),
    "cnnkernels/ops": {"triton"},
    "cnnkernels/nn": {"triton", "ops"},
    "models": {"triton", "ops", "nn"},
}
LOWER = {"_library", "_backends", "reference", "_cost"}


def _imported_subpackages(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("cnnkernels."):
            found.add(node.args[0].value.split(".")[1])  # importlib.import_module("cnnkernels.<layer>...")
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "cnnkernels" and len(parts) > 1:
                found.add(parts[1])
            if parts[0] == "cnnkernels" and len(parts) == 1 and isinstance(node, ast.ImportFrom):
                found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_downwards(layer):
    own = pathlib.PurePath(layer).name
    allowed = LAYERS[layer] | LOWER | {own}
    for path in sorted((ROOT / layer).glob("*.py")):
        upward = _imported_subpackages(path) - allowed
        assert not upward, f"{path.relative_to(ROOT)} imports cnnkernels.{sorted(upward)} from above its layer"
