"""Ahead-of-time compile of every Triton kernel of se_excite for sm_80 and sm_90, with no
GPU: each must compile, spill no registers and fit the SM's shared memory.

The launches compiled are the ones the launchers really make: forward and backward run
on small CPU tensors shaped like SE-ResNet gates (every dtype the GPU path takes, NCHW
and channels_last, with and without bias / residual / relu, every subset of gradients
that changes the constexprs), with every kernel swapped for a recorder. The machinery
(specialisation exactly as JITFunction.run does it, ptxas -v for the spills) is that of
tests/triton/aot.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret,
                                reason="TRITON_INTERPRET=1: triton.language is built for the interpreter")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from cnnkernels import reference  # noqa: E402
from cnnkernels.triton import se_excite as module  # noqa: E402
from cnnkernels.triton._launch import DualKernel  # noqa: E402
from aot import CAPABILITIES, SHARED_LIMIT, Recorder, specialize, ptxas_usage  # noqa: E402

KERNELS = sorted(name for name, value in vars(module).items() if isinstance(value, DualKernel))
# (C, R, H): SE-ResNet-50 stages 1 and 4 (reduction 16), and an odd small gate.
GATES = [(256, 16, 7), (2048, 128, 3), (37, 5, 5)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _record_launches(dtype) -> list:
    launches: list = []
    saved = {name: getattr(module, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(module, name, Recorder(saved[name], launches))
        for (c, r, h), channels_last, variant in itertools.product(GATES, (False, True), (0, 1)):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(2, c, h, h, dtype=dtype).contiguous(memory_format=fmt)
            w1, w2 = torch.randn(r, c, dtype=dtype), torch.randn(c, r, dtype=dtype)
            bias = variant == 0
            b1 = torch.randn(r, dtype=dtype) if bias else None
            b2 = torch.randn(c, dtype=dtype) if bias else None
            res = torch.randn_like(x) if bias else None
            activation = "relu" if bias else "none"
            sdtype = reference.stats_dtype(dtype)
            out = module.forward(x, w1, b1, w2, b2, res, activation)[0]
            stats = (torch.rand(2, c, dtype=sdtype), torch.rand(2, r, dtype=sdtype), torch.rand(2, c, dtype=sdtype))
            for mask in ([True] * 6, [True, False, False, False, False, False], [False] * 5 + [True],
                         [False, True, False, True, False, False], [False, False, True, False, True, False]):
                module.backward(torch.randn_like(out), out, x, w1, w2, *stats, activation, mask)
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    return launches


def _unique_compiles(capability):
    backend = make_backend(GPUTarget("cuda", capability, 32))
    seen = {}
    for dtype in DTYPES:
        for dual, args, kwargs in _record_launches(dtype):
            options, signature, constexprs, attrs = specialize(dual, args, kwargs, backend)
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
        _, stores, loads = ptxas_usage(compiled.asm["ptx"], capability)
        report.append((key, compiled.metadata.shared, stores, loads))
    print("\n".join(f"sm_{capability} {k[0]} {dict(k[2])} shared={s} spills={st}/{ld}" for k, s, st, ld in report))
    assert [r for r in report if r[2] or r[3]] == []
    assert [r for r in report if r[1] > SHARED_LIMIT[capability]] == []
