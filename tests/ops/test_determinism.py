"""Under torch.use_deterministic_algorithms(True) every op, on every backend that runs the
input, gives bitwise identical forward outputs, gradients and running statistics when
run twice on the same inputs (or raises the error torch raises for a nondeterministic
op; no backend here needs to). GPU backends are marked gpu and run unchanged on a GPU."""
from __future__ import annotations

import pytest
import torch

import cnnkernels
from cnnkernels import ops
from helpers import skip_or_fail

BACKENDS = [pytest.param("reference"), pytest.param("cpu"), pytest.param("triton"),
            pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton-gpu", marks=pytest.mark.gpu)]


def _inputs(device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    return {"x": rand(3, 8, 6, 6), "w": rand(16, 8, 3, 3), "w1x1": rand(8, 8, 1, 1), "g": rand(16), "b": rand(16),
            "g8": rand(8), "b8": rand(8), "res": rand(3, 16, 6, 6), "fc1": rand(2, 8), "fc1b": rand(2),
            "fc2": rand(8, 2), "fc2b": rand(8), "other": rand(3, 8, 6, 6)}


def _conv_bn_act(t, training):
    mean, var = torch.zeros_like(t["g"]), torch.ones_like(t["g"])
    out = ops.conv_bn_act(t["x"], t["w"], None, t["g"], t["b"], mean, var, padding=1, training=training,
                          residual=t["res"], activation="relu")
    return out, (mean, var)


def _bn_act_conv(t, training):
    mean, var = torch.zeros_like(t["g8"]), torch.ones_like(t["g8"])
    out = ops.bn_act_conv(t["x"], t["w"], None, t["g8"], t["b8"], mean, var, padding=1, training=training)
    return out, (mean, var)


def _se_excite(t, training):
    return ops.se_excite(t["x"], t["fc1"], t["fc1b"], t["fc2"], t["fc2b"], residual=t["other"],
                         activation="relu"), ()


def _add_act(t, training):
    return ops.add_act(t["x"], t["other"]), ()


CALLS = {"conv_bn_act": _conv_bn_act, "bn_act_conv": _bn_act_conv, "se_excite": _se_excite, "add_act": _add_act}


def _run(call, backend, device, training):
    inputs = {k: v.requires_grad_() for k, v in _inputs(device).items()}
    with cnnkernels.use_backend(backend):
        out, stats = call(inputs, training)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        out.backward(grad_out)
    grads = {k: v.grad for k, v in inputs.items() if v.grad is not None}
    return out.detach(), grads, [s.clone() for s in stats]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_runs_are_bitwise_identical(deterministic, backend, op, training):
    device = "cuda" if backend in ("cuda", "triton-gpu") else "cpu"
    backend = "triton" if backend == "triton-gpu" else backend
    if backend == "cpu" and not cnnkernels._library.extension_loaded():
        skip_or_fail("cnnkernels._C is not built")
    first, second = (_run(CALLS[op], backend, device, training) for _ in range(2))
    assert torch.equal(first[0], second[0]), "forward output differs between two runs"
    assert first[1].keys() == second[1].keys() and first[1], "no gradients"
    for key in first[1]:
        assert torch.equal(first[1][key], second[1][key]), f"gradient of {key} differs between two runs"
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b), "running statistics differ between two runs"


def test_the_fixture_restores_the_global_flag(deterministic):
    assert torch.are_deterministic_algorithms_enabled()
