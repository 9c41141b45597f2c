"""mutmut over the Python and Triton sources (issue 14's test strength): each file below is
mutated by mutmut and checked against the tests that should notice a fault in it. Run by
hand, in a scratch clone (mutmut writes every mutant into the source file): `make mutation`,
or

    .venv/bin/python -m pip install -r requirements-mutation.txt
    .venv/bin/python tests/mutmut_run.py              # every file below
    .venv/bin/python tests/mutmut_run.py add_act      # the files whose paths contain these words

mutmut 2 writes the mutant into the file itself, so Triton's interpreter runs the mutated
kernels too (mutmut 3 swaps functions for trampolines and leaves decorated ones, every
@triton.jit kernel, alone). Prints killed / survived / timeout per file and writes each
survivor's diff to mutmut-survivors.txt.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import shutil
import sqlite3
import subprocess
import sys

from mutation import import_from_this_tree

ROOT = pathlib.Path(__file__).resolve().parent.parent
MUTMUT = [sys.executable, "-m", "mutmut"]

TARGETS = {
    "cnnkernels/nn/_batch_norm_state.py": ("tests/ops/test_invariants.py", "tests/nn/test_conv_bn_act_module.py",
                                           "tests/nn/test_bn_act_conv_module.py", "-k", "not triton"),
    "cnnkernels/ops/_checks.py": ("tests/ops/test_bad_arguments.py", "tests/ops/test_add_act.py",
                                  "tests/ops/test_properties.py", "tests/ops/test_one_wide_dilated_kernels.py",
                                  "-k", "not triton"),
    "cnnkernels/ops/add_act.py": ("tests/ops/test_add_act.py", "tests/ops/test_invariants.py", "tests/test_analysis.py",
                                  "tests/bench/test_traffic.py", "tests/test_op_declarations.py",
                                  "tests/ops/test_bad_arguments.py", "-k", "add_act or standalone or not triton"),
    "cnnkernels/triton/add_act.py": ("tests/ops/test_add_act.py", "tests/ops/test_invariants.py", "-k", "triton"),
    "cnnkernels/triton/_tile.py": ("tests/ops/test_invariants.py", "tests/ops/test_conv_bn_act.py", "-k", "triton"),
    "cnnkernels/nn/sync_batchnorm.py": ("tests/nn/test_sync_batchnorm.py",),
}
"""Each mutated file and the pytest arguments of the tests that should kill its mutants."""


def pytest_command(tests: tuple[str, ...]) -> str:
    return shlex.join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests])


def mutate(path: str, tests: tuple[str, ...]) -> None:
    subprocess.run([*MUTMUT, "run", "--paths-to-mutate", path, "--runner", pytest_command(tests),
                    "--tests-dir", "tests", "--simple-output", "--no-progress",
                    "--test-time-multiplier", "3", "--test-time-base", "60"], cwd=ROOT)


def statuses() -> dict[str, dict[str, list[int]]]:
    """{file: {status: [mutant ids]}} from mutmut's cache (statuses ok_killed, ok_suspicious,
    bad_survived, bad_timeout, untested, skipped)."""
    found: dict[str, dict[str, list[int]]] = {}
    with sqlite3.connect(ROOT / ".mutmut-cache") as db:
        rows = db.execute("SELECT SourceFile.filename, Mutant.status, Mutant.id FROM Mutant "
                          "JOIN Line ON Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id")
        for filename, status, mutant_id in rows:
            found.setdefault(filename, {}).setdefault(status, []).append(mutant_id)
    return found


def main(words: list[str]) -> int:
    if importlib.util.find_spec("mutmut") is None:
        print(f"mutmut is not installed: {sys.executable} -m pip install -r requirements-mutation.txt")
        return 2
    chosen = {p: t for p, t in TARGETS.items() if not words or any(w in p for w in words)}
    import_from_this_tree()
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # two mutants of one size within a second share a stale .pyc
    for cache in ROOT.glob("cnnkernels/**/__pycache__"):
        shutil.rmtree(cache)
    # the cache is written by mutmut as it goes: reading it (mutmut show/results) meanwhile
    # can break the run
    for path, tests in chosen.items():
        print(f"== {path}: {pytest_command(tests)}", flush=True)
        mutate(path, tests)
    found = statuses()
    rows, survivors = [], []
    for path in chosen:
        by_status = found.get(path, {})
        counts = {k: len(v) for k, v in by_status.items()}
        rows.append((path, counts))
        for status, ids in by_status.items():
            if not status.startswith("ok_"):
                survivors += [(path, status, i) for i in ids]
    with open(ROOT / "mutmut-survivors.txt", "w") as out:
        for path, status, i in survivors:
            diff = subprocess.run([*MUTMUT, "show", str(i)], cwd=ROOT, capture_output=True, text=True).stdout
            out.write(f"# {path}: {status}, mutant {i}\n{diff}\n")
    total_killed = total = 0
    for path, counts in rows:
        killed = sum(v for k, v in counts.items() if k.startswith("ok_"))
        total_killed, total = total_killed + killed, total + sum(counts.values())
        print(f"{killed:4d}/{sum(counts.values()):4d} killed  {path}  {counts}")
    print(f"\nmutmut score: {total_killed}/{total} killed; survivors in mutmut-survivors.txt")
    return 0 if total_killed == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
