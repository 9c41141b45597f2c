"""Ahead-of-time compile of every Triton kernel of conv_bn_act for sm_80 and sm_90, with
no GPU: each must compile, spill no registers and fit the SM's shared memory.

The launches to compile are the ones the launchers really make: forward and backward
run on small CPU tensors shaped like ResNet / ResNeXt / depthwise layers, with every
kernel swapped for a recorder. Each recorded launch is specialised exactly as
JITFunction.run would on a GPU (same binder: ints equal to 1 become constants, 16-aligned
ints and pointers get tt.divisibility) and compiled with
triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)).

Register spills: CompiledKernel.n_spills is only filled in when the binary is loaded
onto a GPU (driver.load_binary), so the test runs Triton's own ptxas on the kernel's
PTX with -v (the flags Triton uses) and reads "bytes spill stores/loads".
Launches that differ only in integer specialisation are compiled once.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from cnnkernels.triton import conv_bn_act as module  # noqa: E402
from cnnkernels.triton._launch import DualKernel  # noqa: E402

# Max dynamic shared memory per block: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
CAPABILITIES = (80, 90)
KERNELS = sorted(name for name, value in vars(module).items() if isinstance(value, DualKernel))

# (c_in, c_out, kernel, stride, groups): the layer families the launcher distinguishes.
# Together they reach every entry of conv_bn_act._conv_config's table.
LAYERS = [
    (3, 64, 7, 2, 1),        # stem: direct, 64 columns
    (3, 16, 3, 1, 1),        # direct, 16 columns
    (32, 32, 3, 1, 32),      # depthwise: direct
    (256, 256, 3, 1, 32),    # ResNeXt grouped, 8 channels per group: narrow 16 x 16 tiles
    (64, 64, 1, 1, 1),       # bottleneck 1x1: wide, 64 columns
    (64, 256, 3, 2, 1),      # wide, 128 columns (tensor cores), stride 2
]
# float16 is left out: it compiles to the same tiles and resources as bfloat16.
DTYPES = ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))


class _Recorder:
    def __init__(self, dual: DualKernel, launches: list):
        self.dual, self.launches = dual, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.dual, args, kwargs))
        return record


def _record_launches(dtype, precision) -> list:
    launches: list = []
    saved = {name: getattr(module, name) for name in KERNELS}
    saved_precision = module._dot_precision
    try:
        for name in KERNELS:
            setattr(module, name, _Recorder(saved[name], launches))
        module._dot_precision = lambda device: precision
        for c_in, c_out, k, stride, groups in LAYERS:
            x = torch.randn(2, c_in, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c_out, c_in // groups, k, k, dtype=dtype)
            vec = torch.rand(c_out) + 0.5
            h_out = (6 + 2 * (k // 2) - k) // stride + 1
            residual = torch.randn(2, c_out, h_out, h_out, dtype=dtype).contiguous(memory_format=torch.channels_last)
            conv = ([stride] * 2, [k // 2] * 2, [1, 1], groups)
            for training in (True, False):
                out, conv_out, mean, var = module.forward(x, w, vec.to(dtype), vec, vec, vec, vec, *conv, training,
                                                          1e-5, residual, "relu")
                module.backward(torch.randn_like(out), out, x, w, vec.to(dtype), conv_out, vec, mean, var, *conv,
                                training, 1e-5, "relu", [False, False, False, True, True, True])
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        module._dot_precision = saved_precision
    return launches


def _specialize(dual: DualKernel, args, kwargs, backend):
    """What JITFunction.run would compile for these arguments on a GPU of `backend`."""
    jit = dual.jit
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return jit._pack_args(backend, options, bound_args, specialization, options)


def _spills(ptx: str, capability: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp, "kernel.o"))],
            check=True, capture_output=True, text=True).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert found, log
    return sum(int(s) for s, _ in found), sum(int(l) for _, l in found)


def _unique_compiles(capability):
    """{description: (jit, signature, constexprs, attrs, options)} over all recorded launches."""
    backend = make_backend(GPUTarget("cuda", capability, 32))
    seen = {}
    for dtype, precision in DTYPES:
        for dual, args, kwargs in _record_launches(dtype, precision):
            options, signature, constexprs, attrs = _specialize(dual, args, kwargs, backend)
            pointers = tuple(v for v in signature.values() if v.startswith("*"))
            consts = tuple(sorted((dual.jit.arg_names[k[0]], str(v)) for k, v in constexprs.items()
                                  if dual.jit.params[k[0]].is_constexpr))
            key = (dual.__name__, pointers, consts, options.num_warps, options.num_stages)
            seen.setdefault(key, (dual.jit, signature, constexprs, attrs, options))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_launched_kernel_compiles_without_spills(capability):
    compiles = _unique_compiles(capability)
    assert {key[0] for key in compiles} == set(KERNELS)
    target = GPUTarget("cuda", capability, 32)
    report = []
    for key, (jit, signature, constexprs, attrs, options) in compiles.items():
        compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options.__dict__)
        stores, loads = _spills(compiled.asm["ptx"], capability)
        report.append((key, compiled.metadata.shared, stores, loads))
    print("\n".join(f"sm_{capability} {k[0]} {dict(k[2])} warps={k[3]} stages={k[4]} shared={s} spills={st}/{ld}"
                    for k, s, st, ld in report))
    assert [r for r in report if r[2] or r[3]] == []
    assert [r for r in report if r[1] > SHARED_LIMIT[capability]] == []
