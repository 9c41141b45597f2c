"""Ahead-of-time compile of the Triton kernels of add_act for sm_80 and sm_90, with no
GPU: each launch the launchers make (recorded from forward / backward on small CPU
tensors, every dtype the GPU runs, relu and none) must compile, spill no registers and
fit the SM's shared memory. Specialisation and the spill check are those of
tests/triton/aot.py."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from cnnkernels.triton import add_act as module  # noqa: E402
from cnnkernels.triton._launch import DualKernel  # noqa: E402
from aot import CAPABILITIES, SHARED_LIMIT, Recorder, specialize, ptxas_usage  # noqa: E402

KERNELS = sorted(name for name, value in vars(module).items() if isinstance(value, DualKernel))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _record_launches() -> list:
    launches: list = []
    saved = {name: getattr(module, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(module, name, Recorder(saved[name], launches))
        for dtype in DTYPES:
            x = torch.randn(2, 8, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
            residual = torch.randn(2, 8, 5, 7, dtype=dtype)
            for activation in ("relu", "none"):
                out = module.forward(x, residual, activation)
                module.backward(torch.randn_like(out), out, activation)
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    return launches


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
def test_every_launched_kernel_compiles_without_spills(capability):
    backend = make_backend(GPUTarget("cuda", capability, 32))
    compiles = {}
    for dual, args, kwargs in _record_launches():
        options, signature, constexprs, attrs = specialize(dual, args, kwargs, backend)
        key = (dual.__name__, tuple(signature.values()), tuple(sorted(map(str, constexprs.items()))))
        compiles.setdefault(key, (dual.jit, signature, constexprs, attrs, options))
    assert {key[0] for key in compiles} == set(KERNELS)
    target = GPUTarget("cuda", capability, 32)
    report = []
    for key, (jit, signature, constexprs, attrs, options) in compiles.items():
        compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options.__dict__)
        assert "ld.global" in compiled.asm["ptx"]
        _, stores, loads = ptxas_usage(compiled.asm["ptx"], capability)
        report.append((key, compiled.metadata.shared, stores, loads))
    assert len(report) == 2 * len(DTYPES) * 2  # forward and backward x dtype x activation
    assert [r for r in report if r[2] or r[3]] == []
    assert [r for r in report if r[1] > SHARED_LIMIT[capability]] == []
