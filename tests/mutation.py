"""Planted faults the suite must catch (issue 14's test-strength check), run by hand:

    .venv/bin/python tests/mutation.py            # every mutant, a summary table at the end
    .venv/bin/python tests/mutation.py relu eps   # the mutants whose names contain these words

Each mutant replaces one exact piece of source text (the Python ops, the Triton kernels,
the CUDA kernels that tests/cuda_emulation builds and runs on the host, the models),
runs the tests that should notice, and restores the file whatever happens. A mutant is
"killed" when those tests fail. C++ CPU kernels are left out: each would need a rebuild
of the extension (minutes). Not part of `make test` (one pytest run per mutant).
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
           'conv_bn_act_modules(self.conv2, self.bn2, out, residual=identity, activation="relu")',
           'conv_bn_act_modules(self.conv2, self.bn2, out, residual=identity, activation="none")',
           ("tests/models/test_resnet_family.py", "-k", "resnet18")),
    Mutant("pre-act ResNet: residual sum dropped", "models/preact_resnet.py",
           'return add_act(self._units(out), identity, activation="none")', "return self._units(out)",
           ("tests/models/test_preact_resnet.py",)),
    Mutant("add_act backward: mask on x instead of out", "cnnkernels/ops/add_act.py",
           "(out,) = ctx.saved_tensors", "(out,) = ctx.saved_tensors\n        out = out - 1",
           ("tests/ops/test_add_act.py", "-k", "reference")),
]


def run(mutant: Mutant) -> tuple[str, float]:
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return "not applied (source text changed)", 0.0
    path.write_text(original.replace(mutant.old, mutant.new))
    start = time.time()
    try:
        env = {**os.environ, "CNNKERNELS_REQUIRE_EXTENSION": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutant.tests], cwd=ROOT, capture_output=True, text=True, env=env)
    finally:
        path.write_text(original)
    return ("killed" if result.returncode != 0 else "SURVIVED"), time.time() - start


def main(words: list[str]) -> int:
    chosen = [m for m in MUTANTS if not words or any(w in m.name for w in words)]
    rows = []
    for mutant in chosen:
        status, seconds = run(mutant)
        rows.append((mutant.name, status, seconds))
        print(f"{status:9s} {seconds:6.1f}s  {mutant.name}", flush=True)
    killed = sum(status == "killed" for _, status, _ in rows)
    applied = sum(not status.startswith("not applied") for _, status, _ in rows)
    print(f"\nmutation score: {killed}/{applied} killed")
    return 0 if killed == applied else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
