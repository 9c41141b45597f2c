"""Property-based tests (hypothesis): every op on every backend that claims the input,
over random shapes, strides (contiguous, channels_last, sliced views), groups, kernel sizes
and stride / padding / dilation (square or per axis), dtypes, with and without bias /
residual / running statistics, batch 1 and odd channel counts, forward and backward
against the float64 reference.

Examples are drawn deterministically (derandomize) and bounded so that `make test` keeps
its time; `pytest --hypothesis-profile thorough tests/ops/test_properties.py` draws many
more, at random. A failing example found here is fixed and pinned as a regular test.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cnnkernels
from cnnkernels import BackendError, ops
from helpers import rel_err, skip_or_fail

# examples per (op, backend) in the "cnnkernels" profile (tests/conftest.py loads it unless
# --hypothesis-profile names another): the interpreter runs Triton slowly
EXAMPLES = {"reference": 10, "cpu": 25, "triton": 6}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


def _examples(backend):
    if settings.get_current_profile_name() == "cnnkernels":
        return settings(max_examples=EXAMPLES[backend])
    return settings()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the given layout: contiguous, channels_last, or a sliced view (every
    other element of a wider tensor along the last dimension)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _compare(call, tensors: dict, backend: str, dtype: torch.dtype):
    """call(**tensors) on `backend` in `dtype` against the reference in float64: the first
    output and the gradients of every tensor that requires one."""
    if backend == "cpu" and not cnnkernels._library.extension_loaded():
        skip_or_fail("cnnkernels._C is not built")
    gen = torch.Generator().manual_seed(0)
    results = []
    for run_backend, run_dtype in ((backend, dtype), ("reference", torch.float64)):
        inputs = {k: (v.detach().to(run_dtype).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                  for k, v in tensors.items()}
        try:
            with cnnkernels.use_backend(run_backend):
                out = call(**inputs)
                out = out[0] if isinstance(out, tuple) else out
                if results:
                    grad = results[0][2].double()
                else:
                    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(run_dtype)
                leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
                grads = torch.autograd.grad(out, leaves, grad) if leaves and out.numel() else []
        except BackendError:
            assume(False)  # the backend does not claim this input: it said why; nothing to compare
        results.append((out.detach(), [g.detach() for g in grads], grad))
    (out, grads, _), (ref, ref_grads, grad_out) = results
    bound = TOLERANCE[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < bound, f"forward rel err {rel_err(out, ref):.3g}"
    names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    for name, g, r in zip(names, grads, ref_grads):
        # relative to the larger of the gradient and grad_out: a gradient that cancels to ~0
        # (BatchNorm's with two values per channel is exactly 0) has no relative error
        err = (g.double() - r).norm().item() / max(r.norm().item(), grad_out.double().norm().item(), 1e-30)
        assert err < 10 * bound, f"grad {name}: error {err:.3g} of max(|grad|, |grad_out|)"


def _per_axis(draw, values):
    """(height, width) values: the same on both axes half the time, independent otherwise."""
    first = draw(values)
    return (first, first) if draw(st.booleans()) else (first, draw(values))


def _as_argument(pair):
    """A pair of equal values as an int, as users write it; else the pair."""
    return pair[0] if pair[0] == pair[1] else pair


@st.composite
def conv_cases(draw, bn_over: str):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in, c_out = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    k, stride = _per_axis(draw, st.sampled_from([1, 2, 3])), _per_axis(draw, st.sampled_from([1, 2]))
    dilation, padding = _per_axis(draw, st.sampled_from([1, 2])), _per_axis(draw, st.integers(0, 2))
    span = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    h, w = (draw(st.integers(max(1, sp - 2 * p), 9)) for sp, p in zip(span, padding))
    n = draw(st.integers(1, 3))
    h_out, w_out = ((size + 2 * p - sp) // st_ + 1 for size, p, sp, st_ in zip((h, w), padding, span, stride))
    training = draw(st.booleans())
    bn_positions = n * (h_out * w_out if bn_over == "output" else h * w)
    assume(h_out >= 1 and w_out >= 1 and (not training or bn_positions > 1))
    return dict(n=n, c_in=c_in, c_out=c_out, k=k, h=h, w=w, groups=groups, stride=_as_argument(stride),
                padding=_as_argument(padding), dilation=_as_argument(dilation), training=training,
                bias=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
                running=draw(st.booleans()) or not training, relu=draw(st.booleans()), residual=draw(st.booleans()),
                h_out=h_out, w_out=w_out, dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2 ** 16)))


def _conv_tensors(case, bn_channels):
    gen = torch.Generator().manual_seed(case["seed"])

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)
    x = _layout(rand(case["n"], case["c_in"], case["h"], case["w"], grad=False), case["layout"]).requires_grad_()
    tensors = dict(x=x, weight=rand(case["c_out"], case["c_in"] // case["groups"], *case["k"]),
                   bias=rand(case["c_out"]) if case["bias"] else None,
                   bn_weight=(torch.rand(bn_channels, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(),
                   bn_bias=rand(bn_channels))
    if case["running"]:
        tensors["running_mean"] = rand(bn_channels, grad=False)
        tensors["running_var"] = torch.rand(bn_channels, generator=gen, dtype=torch.float64) + 0.5
    return tensors


def _conv_kwargs(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                training=case["training"], activation="relu" if case["relu"] else "none")


def _with_fresh_stats(op, kwargs):
    """The op on copies of the running statistics, so both runs start from the same ones."""
    def call(running_mean=None, running_var=None, **tensors):
        stats = [None if s is None else s.detach().clone() for s in (running_mean, running_var)]
        return op(running_mean=stats[0], running_var=stats[1], **tensors, **kwargs)
    return call


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_conv_bn_act_properties(backend):
    @_examples(backend)
    @given(case=conv_cases("output"))
    def check(case):
        tensors = _conv_tensors(case, case["c_out"])
        if case["residual"]:
            res = torch.randn(case["n"], case["c_out"], case["h_out"], case["w_out"], dtype=torch.float64,
                              generator=torch.Generator().manual_seed(case["seed"] + 1))
            tensors["residual"] = _layout(res, case["layout"]).requires_grad_()
        _compare(_with_fresh_stats(ops.conv_bn_act, _conv_kwargs(case)), tensors, backend, case["dtype"])
    check()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bn_act_conv_properties(backend):
    @_examples(backend)
    @given(case=conv_cases("input"))
    def check(case):
        _compare(_with_fresh_stats(ops.bn_act_conv, _conv_kwargs(case)), _conv_tensors(case, case["c_in"]), backend,
                 case["dtype"])
    check()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_se_excite_properties(backend):
    @_examples(backend)
    @given(n=st.integers(1, 3), c=st.integers(1, 12), r=st.integers(1, 5), h=st.integers(1, 7), w=st.integers(1, 7),
           residual=st.booleans(), relu=st.booleans(), fc_bias=st.booleans(),
           layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
           dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
    def check(n, c, r, h, w, residual, relu, fc_bias, layout, dtype, seed):
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)
        tensors = dict(x=_layout(rand(n, c, h, w), layout).requires_grad_(), fc1_weight=rand(r, c).requires_grad_(),
                       fc1_bias=rand(r).requires_grad_() if fc_bias else None, fc2_weight=rand(c, r).requires_grad_(),
                       fc2_bias=rand(c).requires_grad_() if fc_bias else None)
        if residual:
            tensors["residual"] = _layout(rand(n, c, h, w), layout).requires_grad_()

        def call(**t):
            return ops.se_excite(**t, activation="relu" if relu else "none")
        _compare(call, tensors, backend, dtype)
    check()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_add_act_properties(backend):
    @_examples(backend)
    @given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=5), relu=st.booleans(),
           layouts=st.tuples(*[st.sampled_from(["contiguous", "channels_last", "sliced"])] * 2),
           dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
    def check(shape, relu, layouts, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        x, res = (_layout(torch.randn(*shape, generator=gen, dtype=torch.float64), layout).requires_grad_()
                  for layout in layouts)

        def call(x, residual):
            return ops.add_act(x, residual, activation="relu" if relu else "none")
        _compare(call, dict(x=x, residual=res), backend, dtype)
    check()
