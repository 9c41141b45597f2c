"""Planted faults the suite must catch (issue 14's test-strength check), run by hand:

    .venv/bin/python tests/mutation.py            # every mutant, a summary table at the end
    .venv/bin/python tests/mutation.py relu eps   # the mutants whose names contain these words
    .venv/bin/python tests/mutation.py --no-build # leave out the C++ mutants (no rebuilds)

Each mutant replaces one exact piece of source text (the Python ops, the Triton kernels,
the CUDA kernels that tests/cuda_emulation builds and runs on the host, the models, the
C++ CPU kernels), runs the tests that should notice, and restores the file whatever
happens. A mutant is "killed" when those tests fail. Every process those tests start
imports cnnkernels from this tree (import_from_this_tree), also in a scratch clone run with
another checkout's venv.

A C++ mutant (csrc/cpu, csrc/autograd) rebuilds the extension in place first
(`setup.py build_ext --inplace`: ninja recompiles the sources that include the changed
file and relinks, about a minute), so the tree must have been built that way once;
afterwards the source is put back and built again. Not part of `make test` (one pytest run
per mutant, two compiles per C++ one): `make mutation` runs this and mutmut
(tests/mutmut_run.py) in a scratch clone.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]

    @property
    def rebuilds(self) -> bool:
        return self.path.startswith(("csrc/cpu/", "csrc/autograd/", "csrc/registration"))


MUTANTS = [
    Mutant("triton eval: eps dropped from the scale", "cnnkernels/triton/conv_bn_act.py",
           "torch.rsqrt(running_var.to(sdtype) + eps)", "torch.rsqrt(running_var.to(sdtype))",
           ("tests/ops/test_invariants.py", "-k", "triton")),
    Mutant("triton tail: relu lets -1e-4 through", "cnnkernels/triton/_tile.py",
           "z = tl.where(z < 0.0, 0.0, z)", "z = tl.where(z < -1e-4, 0.0, z)",
           ("tests/ops/test_invariants.py", "-k", "triton")),
    Mutant("triton tail: residual added after the relu", "cnnkernels/triton/_tile.py",
           "    if HAS_RESIDUAL:\n        z += tl.load(res_ptr + res_offsets, mask=mask, other=0.0).to(ACC_DTYPE)\n"
           "    if RELU:\n        z = tl.where(z < 0.0, 0.0, z)\n",
           "    if RELU:\n        z = tl.where(z < 0.0, 0.0, z)\n"
           "    if HAS_RESIDUAL:\n        z += tl.load(res_ptr + res_offsets, mask=mask, other=0.0).to(ACC_DTYPE)\n",
           ("tests/ops/test_conv_bn_act.py", "-k", "triton")),
    Mutant("triton prologue: shift dropped from bn_act", "cnnkernels/triton/_bn.py",
           "a = x.to(ACC_DTYPE) * scale[None, :] + shift[None, :]", "a = x.to(ACC_DTYPE) * scale[None, :]",
           ("tests/ops/test_bn_act_conv.py", "-k", "triton")),
    Mutant("running variance biased", "cnnkernels/ops/_conv_bn_core.py",
           "(save_var * (count / (count - 1)))", "(save_var * 1.0)",
           ("tests/ops/test_conv_bn_act.py", "tests/ops/test_invariants.py", "-k", "cpu")),
    Mutant("momentum None: off by one batch", "cnnkernels/nn/_batch_norm_state.py",
           "momentum = 1.0 / float(bn.num_batches_tracked)", "momentum = 1.0 / float(bn.num_batches_tracked + 1)",
           ("tests/ops/test_invariants.py", "-k", "cumulative")),
    Mutant("reference BN: unbiased batch variance", "cnnkernels/reference.py",
           "save_var, save_mean = torch.var_mean(y32, dim=(0, 2, 3), unbiased=False)",
           "save_var, save_mean = torch.var_mean(y32, dim=(0, 2, 3), unbiased=True)",
           ("tests/ops/test_conv_bn_act_reference.py",)),
    Mutant("sync BN backward: mean_dy term dropped", "cnnkernels/nn/sync_batchnorm.py",
           "grad_x = ((dy - mean_dy.view(shape) - xmu", "grad_x = ((dy - xmu", ("tests/nn/test_sync_batchnorm.py",)),
    Mutant("sync BN: running variance biased", "cnnkernels/nn/sync_batchnorm.py",
           "(var * total / (total - 1))", "(var * 1.0)", ("tests/nn/test_sync_batchnorm.py",)),
    Mutant("CUDA SE gate: sigmoid off", "csrc/cuda/se_excite_kernels.cuh",
           "gt[ch] = acc_t(1) / (acc_t(1) + exp_value(-v));", "gt[ch] = acc_t(1) / (acc_t(1) + exp_value(v));",
           ("tests/cuda_emulation/test_se_excite_kernels.py",)),
    Mutant("ResNet basic block: no final relu", "models/resnet.py",
           'conv_bn_act_modules(self.conv2, self.bn2, out, residual=identity, activation="relu",',
           'conv_bn_act_modules(self.conv2, self.bn2, out, residual=identity, activation="none",',
           ("tests/models/test_resnet_family.py", "-k", "resnet18")),
    Mutant("pre-act ResNet: residual sum dropped", "models/preact_resnet.py",
           'return add_act(self._units(out), identity, activation="none")', "return self._units(out)",
           ("tests/models/test_preact_resnet.py",)),
    Mutant("add_act backward: mask on x instead of out", "cnnkernels/ops/add_act.py",
           "(out,) = ctx.saved_tensors", "(out,) = ctx.saved_tensors\n        out = out - 1",
           ("tests/ops/test_add_act.py", "-k", "reference")),
    Mutant("C++ add_act: relu lets -1e-4 through", "csrc/cpu/add_act.cpp",
           "if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;", "if constexpr (kRelu) v = v < acc_t(-1e-4) ? acc_t(0) : v;",
           ("tests/ops/test_add_act.py", "tests/ops/test_invariants.py", "-k", "cpu")),
    Mutant("C++ add_act backward: relu mask dropped", "csrc/cpu/add_act.cpp",
           "grad[i] = L::positive(out[i]) ? g : S(0);", "grad[i] = g;",
           ("tests/ops/test_add_act.py", "-k", "cpu")),
    Mutant("C++ conv_bn_act epilogue: residual added after the relu", "csrc/cpu/conv_bn_act.cpp",
           "    if constexpr (kRes) v += to_acc<acc_t>(res[j]);\n    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;\n",
           "    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;\n    if constexpr (kRes) v += to_acc<acc_t>(res[j]);\n",
           ("tests/ops/test_conv_bn_act.py", "tests/ops/test_invariants.py", "-k", "cpu")),
    Mutant("C++ conv_bn_act backward: the y term of grad_y dropped", "csrc/cpu/conv_bn_act.cpp",
           "if constexpr (kY) v -= (to_acc<acc_t>(y[j]) - k.mean[ch]) * k.y_scale[ch];",
           "if constexpr (false) v -= (to_acc<acc_t>(y[j]) - k.mean[ch]) * k.y_scale[ch];",
           ("tests/ops/test_conv_bn_act.py", "-k", "cpu")),
    Mutant("C++ bn_act_conv prologue: shift dropped", "csrc/cpu/bn_act_conv.cpp",
           "return to_acc<acc_t>(x) * scale + shift;", "return to_acc<acc_t>(x) * scale;",
           ("tests/ops/test_bn_act_conv.py", "tests/ops/test_invariants.py", "-k", "cpu")),
    Mutant("C++ bn_act_conv backward: relu mask lets -1e-4 through", "csrc/cpu/bn_act_conv.cpp",
           "pre_activation<acc_t>(x, scale, shift) > acc_t(0) ? g : acc_t(0);",
           "pre_activation<acc_t>(x, scale, shift) > acc_t(-1e-4) ? g : acc_t(0);",
           ("tests/ops/test_bn_act_conv.py", "tests/ops/test_invariants.py", "-k", "cpu")),
    Mutant("C++ batch statistics: mean not shifted back by the reference sample", "csrc/cpu/bn_passes.h",
           "mp[ch] = static_cast<acc_t>(ref + m);", "mp[ch] = static_cast<acc_t>(m);",
           ("tests/ops/test_conv_bn_act.py", "-k", "cpu")),
    Mutant("C++ channel sums: the second sum adds the first", "csrc/cpu/bn_passes.h",
           "part[c + ch] += second[ch];", "part[c + ch] += first[ch];",
           ("tests/ops/test_conv_bn_act.py", "tests/ops/test_bn_act_conv.py", "-k", "cpu")),
    Mutant("C++ SE gate: sigmoid of -v", "csrc/cpu/se_excite.cpp",
           "gi[ch] = acc_t(1) / (acc_t(1) + std::exp(-v));", "gi[ch] = acc_t(1) / (acc_t(1) + std::exp(v));",
           ("tests/ops/test_se_excite.py", "-k", "cpu")),
    Mutant("C++ max pool: windows start at 0 instead of -inf", "csrc/cpu/max_pool.cpp",
           "std::fill(acc.begin(), acc.end(), -std::numeric_limits<acc_t>::infinity());",
           "std::fill(acc.begin(), acc.end(), acc_t(0));",
           ("tests/ops/test_max_pool_native.py",)),
    Mutant("C++ scale-shift pass: relu lets -1e-4 through", "csrc/cpu/bn_act_conv.cpp",
           "if constexpr (kRelu) v = v > acc_t(0) ? v : acc_t(0);", "if constexpr (kRelu) v = v > acc_t(-1e-4) ? v : acc_t(0);",
           ("tests/ops/test_scale_shift_act_native.py", "tests/nn/test_frozen_cpu_densenet.py")),
    Mutant("C++ autograd: only the first input gets a gradient", "csrc/autograd/conv_bn_act.cpp",
           "mask[i] = edges[i] >= 0 && ctx->needs_input_grad(edges[i]);",
           "mask[i] = i == 0 && edges[i] >= 0 && ctx->needs_input_grad(edges[i]);",
           ("tests/ops/test_conv_bn_act.py", "-k", "cpu")),
]


TIMEOUT_S = 1800
"""A mutant whose tests run this long (a hang) counts as killed: the suite noticed."""


def import_from_this_tree() -> None:
    """Make every process the mutants' tests start (pytest, and the workers it spawns) import
    cnnkernels from ROOT. In a scratch clone run with the main checkout's venv, the editable
    install would hand them the main checkout's sources instead: a spawned worker finds no
    cnnkernels on its path, and cnnkernels.models (package-dir "models") is mapped by the
    install whatever the path says, so mutants there would run against unmutated code."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if _models_location() != ROOT / "models" / "__init__.py":
        link = ROOT / "cnnkernels" / "models"
        if not link.exists():
            link.symlink_to(pathlib.Path("..") / "models", target_is_directory=True)
    found = _models_location()
    if found.resolve() != (ROOT / "models" / "__init__.py").resolve():
        raise SystemExit(f"cnnkernels.models imports from {found}, not from this tree ({ROOT}): the mutants "
                         "would run against other sources")


def _models_location() -> pathlib.Path:
    code = "import cnnkernels.models as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                         check=True).stdout
    return pathlib.Path(out.strip())


def build_in_place() -> bool:
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                            capture_output=True, text=True)
    return result.returncode == 0


def run(mutant: Mutant) -> tuple[str, float, str]:
    """(status, seconds, pytest's last line) of one mutant."""
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return "not applied (source text changed)", 0.0, ""
    path.write_text(original.replace(mutant.old, mutant.new))
    start = time.time()
    try:
        if mutant.rebuilds and not build_in_place():
            return "not built (the mutant does not compile)", time.time() - start, ""
        env = {**os.environ, "CNNKERNELS_REQUIRE_EXTENSION": "1"}
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *mutant.tests], cwd=ROOT, capture_output=True, text=True, env=env,
                                    timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "killed", time.time() - start, f"timed out after {TIMEOUT_S} s"
    finally:
        path.write_text(original)
        if mutant.rebuilds and not build_in_place():
            raise RuntimeError(f"the restored {mutant.path} no longer builds: the tree is left mutated")
    last = (result.stdout.strip().splitlines() or [""])[-1]
    return ("killed" if result.returncode != 0 else "SURVIVED"), time.time() - start, last


def main(words: list[str]) -> int:
    no_build = "--no-build" in words
    words = [w for w in words if w != "--no-build"]
    chosen = [m for m in MUTANTS if (not words or any(w in m.name for w in words)) and not (no_build and m.rebuilds)]
    if any(m.rebuilds for m in chosen) and not list(ROOT.glob("build/temp.*/csrc")):
        print("C++ mutants rebuild in place: build the tree once with "
              "`python setup.py build_ext --inplace` (CNNKERNELS_SKIP_CUDA_BUILD=1 keeps nvcc out)")
        return 2
    import_from_this_tree()
    rows = []
    for mutant in chosen:
        status, seconds, last = run(mutant)
        rows.append((mutant.name, status, seconds))
        print(f"{status:9s} {seconds:6.1f}s  {mutant.name}  [{last}]", flush=True)
    killed = sum(status == "killed" for _, status, _ in rows)
    applied = sum(not status.startswith("not ") for _, status, _ in rows)
    print(f"\nmutation score: {killed}/{applied} killed")
    return 0 if killed == applied else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
