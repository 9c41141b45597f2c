"""Ahead-of-time compile of recorded Triton launches for sm_80 / sm_90, with no GPU:
the machinery shared by the tests/triton/test_*_aot.py files.

The launches to compile are the ones the launchers really make: a test runs forward and
backward on small CPU tensors with every kernel of the given modules swapped for a
recorder (record_launches). Each recorded launch is specialised exactly as
JITFunction.run would on a GPU (same binder: ints equal to 1 become constants, 16-aligned
ints and pointers get tt.divisibility) and compiled with
triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)).

Register use and spills: CompiledKernel.n_regs / n_spills are only filled in when the
binary is loaded onto a GPU (driver.load_binary), so ptxas_usage runs Triton's own
ptxas on the kernel's PTX with -v (the flags Triton uses) and reads "Used N registers"
and "bytes spill stores/loads". Launches that differ only in integer specialisation are
compiled once.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from cnnkernels.triton._launch import DualKernel

# Max dynamic shared memory per block: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
CAPABILITIES = (80, 90)

# The AOT test modules' marks: every test runs once per capability, and none under
# TRITON_INTERPRET=1 (triton.language is then built for the interpreter).
skip_if_interpreting = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                          reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
each_capability = pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")


def kernels_of(module) -> list[str]:
    """Names of the module's Triton kernels (DualKernel attributes)."""
    return sorted(name for name, value in vars(module).items() if isinstance(value, DualKernel))


class Recorder:
    """Stands in for a DualKernel: `k[grid](*args, **kwargs)` appends (kernel, args, kwargs)."""

    def __init__(self, dual: DualKernel, launches: list):
        self.dual, self.launches = dual, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.dual, args, kwargs))
        return record


def record_launches(modules, body) -> list:
    """Runs body() with every kernel of `modules` replaced by a Recorder; returns the
    launches [(DualKernel, args, kwargs)] in order. The kernels are restored afterwards."""
    launches: list = []
    saved = [(module, name, getattr(module, name)) for module in modules for name in kernels_of(module)]
    try:
        for module, name, dual in saved:
            setattr(module, name, Recorder(dual, launches))
        body()
    finally:
        for module, name, dual in saved:
            setattr(module, name, dual)
    return launches


def specialize(dual: DualKernel, args, kwargs, backend):
    """What JITFunction.run would compile for these arguments on a GPU of `backend`:
    (options, signature, constexprs, attrs)."""
    jit = dual.jit
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return jit._pack_args(backend, options, bound_args, specialization, options)


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) of the PTX's kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp, "kernel.o"))],
            check=True, capture_output=True, text=True).stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.findall(r"Used (\d+) registers", log)
    assert spills and registers, log
    return (max(int(r) for r in registers), sum(int(s) for s, _ in spills), sum(int(lo) for _, lo in spills))


@dataclass(frozen=True)
class Compiled:
    """One compiled launch: kernel name, its constexprs, launch options and resources."""
    kernel: str
    constexprs: tuple
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int

    def __str__(self):
        return (f"{self.kernel} {dict(self.constexprs)} warps={self.num_warps} stages={self.num_stages} "
                f"registers={self.registers} shared={self.shared} spills={self.spill_stores}/{self.spill_loads}")


def unique_launches(launches, capability) -> dict:
    """{(kernel, pointer types, constexprs, warps, stages, alignment attrs): (jit, signature,
    constexprs, attrs, options)}: the distinct compiles among the launches (one per
    specialisation: an unaligned launch compiles to other code than an aligned one)."""
    backend = make_backend(GPUTarget("cuda", capability, 32))
    seen = {}
    for dual, args, kwargs in launches:
        options, signature, constexprs, attrs = specialize(dual, args, kwargs, backend)
        pointers = tuple(v for v in signature.values() if v.startswith("*"))
        consts = tuple(sorted((dual.jit.arg_names[k[0]], str(v)) for k, v in constexprs.items()
                              if dual.jit.params[k[0]].is_constexpr))
        alignment = repr(sorted(attrs.items()))  # which arguments are 16-divisible / aligned
        key = (dual.__name__, pointers, consts, options.num_warps, options.num_stages, alignment)
        seen.setdefault(key, (dual.jit, signature, constexprs, attrs, options))
    return seen


def compile_launches(launches, capability) -> list[Compiled]:
    """Compiles every distinct launch for sm_<capability> and measures it with ptxas."""
    target = GPUTarget("cuda", capability, 32)
    report = []
    for key, (jit, signature, constexprs, attrs, options) in unique_launches(launches, capability).items():
        compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options.__dict__)
        assert "ld.global" in compiled.asm["ptx"] or "cp.async" in compiled.asm["ptx"], key
        registers, stores, loads = ptxas_usage(compiled.asm["ptx"], capability)
        report.append(Compiled(key[0], key[2], key[3], key[4], compiled.metadata.shared, registers, stores, loads))
    return report


def assert_fits(report: list[Compiled], capability: int) -> None:
    """No spills, shared memory within sm_<capability>'s limit; prints the report (pytest -s)."""
    print("\n".join(f"sm_{capability} {entry}" for entry in report))
    assert [str(e) for e in report if e.spill_stores or e.spill_loads] == []
    assert [str(e) for e in report if e.shared > SHARED_LIMIT[capability]] == []


def assert_kernels_compile(launches, kernels, capability: int) -> list[Compiled]:
    """Compiles every distinct launch for sm_<capability> (compile_launches) and asserts
    that the launches reached exactly the kernels named `kernels`, and that each fits
    (assert_fits). Returns the report."""
    report = compile_launches(launches, capability)
    assert {entry.kernel for entry in report} == set(kernels)
    assert_fits(report, capability)
    return report
