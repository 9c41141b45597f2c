"""The Triton kernels of conv_bn_act, run through Triton's interpreter on CPU tensors,
against the float64 reference: forward and backward, train and eval.

Every buffer the module allocates with torch.empty / torch.empty_like is poisoned with
NaN (the module's `torch` is swapped for a proxy), so an element a kernel forgets to
write shows up as NaN in the compared outputs."""
from __future__ import annotations

import pytest
import torch

from cnnkernels import reference
from cnnkernels.triton import _bn
from cnnkernels.triton import conv_bn_act as triton_conv_bn_act
from helpers import CASES, TOLERANCE, ConvCase, rel_err

EPS = 1e-5
ALL_GRADS = [True] * 6


class _PoisonedTorch:
    """torch, except that empty / empty_like return NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    monkeypatch.setattr(triton_conv_bn_act, "torch", _PoisonedTorch())


def _args(case: ConvCase, dtype, training, seed=0, affine=True):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = case.make(
        dtype, requires_grad=False, seed=seed)
    if not affine:
        bn_weight = bn_bias = None
    return [x, weight, bias, bn_weight, bn_bias, running_mean, running_var, [case.stride] * 2,
            [case.padding] * 2, [case.dilation] * 2, case.groups, training, EPS, residual, case.activation]


def _double(args):
    doubled = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    if isinstance(args[0], torch.Tensor) and reference.output_memory_format(args[0]) == torch.channels_last:
        doubled[0] = doubled[0].contiguous(memory_format=torch.channels_last)
    return doubled


def _check(case: ConvCase, dtype, training, output_mask=ALL_GRADS, affine=True, eval_conv_out=True):
    args = _args(case, dtype, training, affine=affine)
    assert triton_conv_bn_act.unsupported_reasons(*args) == []
    ref_args = _double(args)
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-12
    x, weight, bias, bn_weight = args[0], args[1], args[2], args[3]
    fmt = reference.output_memory_format(x)
    sdtype = reference.stats_dtype(dtype)

    out, conv_out, save_mean, save_var = triton_conv_bn_act.forward(*args)
    ref = reference.conv_bn_act_forward(*ref_args)
    assert out.dtype == dtype and out.shape == ref[0].shape and out.is_contiguous(memory_format=fmt)
    assert save_mean.dtype == sdtype and save_var.dtype == sdtype
    assert rel_err(out, ref[0]) < tol
    assert rel_err(save_mean, ref[2]) < tol and rel_err(save_var, ref[3]) < tol
    if training:
        assert conv_out.shape == ref[1].shape and conv_out.is_contiguous(memory_format=fmt)
        assert rel_err(conv_out, ref[1]) < tol
    else:
        assert conv_out.shape == (0,)

    grad_out = torch.randn(out.shape, dtype=torch.float64)
    if not eval_conv_out:
        conv_out = x.new_empty(0)
    rest = (args[7], args[8], args[9], args[10], training, EPS, case.activation, output_mask)
    grads = triton_conv_bn_act.backward(grad_out.to(dtype), out, x, weight, bias, conv_out, bn_weight,
                                        save_mean, save_var, *rest)
    # The reference gets our `out`: it only decides the relu mask, which must be the same.
    ref_grads = reference.conv_bn_act_backward(
        grad_out.to(dtype).double(), out.double(), ref_args[0], ref_args[1], ref_args[2], ref[1], ref_args[3],
        ref[2], ref[3], *rest)
    masked_grad = reference.conv_bn_act_backward(
        grad_out.to(dtype).double(), out.double(), ref_args[0], ref_args[1], ref_args[2], ref[1], ref_args[3],
        ref[2], ref[3], *rest[:-1], [False] * 5 + [True])[5]
    for i, (name, got, want) in enumerate(zip(("x", "weight", "bias", "bn_weight", "bn_bias", "residual"),
                                              grads, ref_grads)):
        if not output_mask[i]:
            assert got.shape == (0,), name
            continue
        assert got.shape == want.shape, name
        assert got.dtype == (sdtype if name in ("bn_weight", "bn_bias") else dtype), name
        if name in ("x", "residual"):
            assert got.is_contiguous(memory_format=fmt), name
        if name == "bias" and training:
            # The batch mean cancels the conv bias: the true gradient is ~0, so measure
            # against the size of the incoming gradient instead.
            assert (got.double() - want).norm() < tol * masked_grad.norm(), name
        else:
            assert rel_err(got, want) < tol, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32_against_reference(case, training):
    _check(case, torch.float32, training)


EXTRA_CASES = [
    ConvCase("depthwise_multiplier2_bias", c_in=8, c_out=16, hw=6, groups=8, bias=True, residual=True),
    ConvCase("groups4_1x1_channels_last", c_in=32, c_out=24, hw=5, kernel=1, padding=0, groups=4,
             channels_last=True, bias=True, activation="none"),
    ConvCase("groups2_direct_3x3", c_in=6, c_out=10, hw=5, groups=2, bias=True, residual=True),
    ConvCase("wide_k_multi_block", c_in=40, c_out=72, hw=4, n=1, bias=True, residual=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", EXTRA_CASES, ids=lambda c: c.name)
def test_fp32_extra_shapes(case, training):
    _check(case, torch.float32, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16(training):
    _check(ConvCase("bf16_3x3", c_in=6, c_out=10, hw=6, bias=True, residual=True), torch.bfloat16, training)


def test_fp16_channels_last_train():
    _check(ConvCase("fp16", c_in=8, c_out=8, hw=5, channels_last=True, residual=True), torch.float16, True)


def test_fp64_interpreter():
    _check(ConvCase("fp64", c_in=4, c_out=6, hw=5, stride=2, bias=True, residual=True), torch.float64, True)


def test_without_bn_affine():
    _check(ConvCase("no_affine", c_in=4, c_out=6, hw=5, bias=True), torch.float32, True, affine=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_mask", [
    [True, False, False, False, False, False],
    [False, True, True, False, False, True],
    [False, False, False, True, True, False],
    [False, False, False, False, True, False],
    [False] * 6,
], ids=lambda m: "".join("1" if v else "0" for v in m))
def test_output_mask(output_mask, training):
    case = ConvCase("mask", c_in=4, c_out=6, hw=5, bias=True, residual=True)
    _check(case, torch.float32, training, output_mask=output_mask)


def test_eval_recomputes_conv_out_for_grad_bn_weight():
    case = ConvCase("recompute", c_in=4, c_out=6, hw=5, bias=True, residual=True)
    _check(case, torch.float32, False, eval_conv_out=False)


def test_partial_statistics_keep_precision_with_large_mean():
    """Chan-combined per-tile statistics stay exact where sum/sumsq would cancel."""
    case = ConvCase("large_mean", n=4, c_in=4, c_out=8, hw=9, bias=True)
    args = _args(case, torch.float32, True)
    args[2] = args[2] + 3000.0
    _, _, mean, var = triton_conv_bn_act.forward(*args)
    _, _, ref_mean, ref_var = reference.conv_bn_act_forward(*_double(args))
    assert rel_err(mean, ref_mean) < 1e-6
    assert rel_err(var, ref_var) < 1e-4


def test_unsupported_reasons():
    args = _args(ConvCase("reasons", c_in=4, c_out=4, hw=4), torch.float32, True)
    assert triton_conv_bn_act.unsupported_reasons(*args) == []
    bad = list(args)
    bad[-1] = "gelu"
    assert any("gelu" in r for r in triton_conv_bn_act.unsupported_reasons(*bad))
    bad = list(args)
    bad[0] = args[0].to(torch.int32)
    assert triton_conv_bn_act.unsupported_reasons(*bad)
    bad = list(args)
    bad[7] = [8, 8]
    bad[1] = torch.randn(4, 4, 9, 9)
    assert any("zero-size" in r for r in triton_conv_bn_act.unsupported_reasons(*bad))


def test_interpreter_leaves_triton_language_untouched():
    """After an interpreted launch, triton.language is as before: a GPU compile in the
    same process still works."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    call, options = JITFunction.__call__, interpreter.interpreter_builder.options
    triton_conv_bn_act.forward(*_args(ConvCase("hygiene", c_in=4, c_out=4, hw=4), torch.float32, True))
    assert JITFunction.__call__ is call and interpreter.interpreter_builder.options is options
    assert "create_dot" not in vars(interpreter.interpreter_builder)
    assert all(tl.core.is_builtin(f) for f in (tl.full, tl.core.full, tl.load, tl.core.dot, tl.math.sqrt))
    jit = _bn.bwd_finalize_kernel.jit
    constexprs = dict(HAS_V=True, INVSTD=False, ACC_DTYPE=tl.float32, BLOCK_S=16, BLOCK_C=32)
    signature = {name: "constexpr" if name in constexprs else "*fp32" if name.endswith("_ptr")
                 else "fp32" if name == "eps" else "i32" for name in jit.arg_names}
    compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 80, 32))
    assert "ld.global" in compiled.asm["ptx"]
