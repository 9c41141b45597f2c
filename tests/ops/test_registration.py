"""Every registered op, read from the registries (cnnkernels.ops._registration.PUBLIC_CALLS
and cnnkernels._backends), so that a new op is covered without editing this file: its
schema and dispatcher kernels exist, every backend is registered, explain() and
`python -m cnnkernels.info` name every backend, the public call is the schema op on the
normalised arguments, and opcheck passes on each op's sample call on every backend."""
import pytest
import torch

import cnnkernels
from cnnkernels import _backends, _library, info, ops
from cnnkernels.ops._registration import PUBLIC_CALLS
from op_matrix import BACKENDS, device_of, opcheck, require_backend

PUBLIC_OPS = sorted(PUBLIC_CALLS)
REGISTERED_OPS = sorted(_backends._registry)


def sample(op_name):
    """The op's sample call on CPU tensors: (args, kwargs) of ops.explain / the public op."""
    return PUBLIC_CALLS[op_name].sample("cpu")


def public_op(op_name):
    """The Python function users call for op_name (an out= variant is its op called with out=)."""
    return getattr(ops, op_name.removesuffix("_into"))


@pytest.mark.parametrize("op_name", REGISTERED_OPS)
def test_every_backend_and_dispatcher_kernel_is_registered(op_name):
    assert sorted(_backends.implementations(op_name)) == sorted(_backends.BACKENDS)
    assert hasattr(torch.ops.cnnkernels, op_name)
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkernels::{op_name}", key), key


@pytest.mark.parametrize("op_name", [op for op in PUBLIC_OPS if not op.endswith("_into")])  # out=: no autograd
def test_public_op_has_its_backward_registered(op_name):
    assert f"{op_name}_backward" in REGISTERED_OPS


@pytest.mark.parametrize("op_name", PUBLIC_OPS)
def test_explain_names_every_backend(op_name):
    args, kwargs = sample(op_name)
    verdict = ops.explain(op_name, *args, **kwargs)
    assert verdict["op"] == op_name and verdict["forced"] is None
    assert set(verdict["rejected"]) | {verdict["backend"]} <= set(_backends.BACKENDS)
    assert "needs cuda tensors, got cpu" in verdict["rejected"]["cuda"]
    if _library.extension_loaded():
        assert verdict["backend"] == "cpu", verdict
    else:
        assert verdict["backend"] == "reference"
        assert "cnnkernels._C is not loaded" in " ".join(verdict["rejected"]["cpu"])


def test_explain_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'conv_bn_relu'; known: " + ", ".join(PUBLIC_OPS)):
        ops.explain("conv_bn_relu", torch.randn(1))


@pytest.mark.parametrize("op_name", PUBLIC_OPS)
def test_info_lists_the_op(op_name):
    report = info.report()
    assert f"{op_name} on cpu float32 tensors" in report


@pytest.mark.parametrize("op_name", PUBLIC_OPS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_public_call_is_the_schema_op_on_normalised_arguments(backend, op_name):
    args, kwargs = sample(op_name)
    require_backend(backend, op_name, *args, **kwargs)
    schema_args = PUBLIC_CALLS[op_name].normalize(*args, **kwargs)
    with cnnkernels.use_backend(backend), torch.no_grad():
        direct = getattr(torch.ops.cnnkernels, op_name)(*schema_args)
        public = public_op(op_name)(*args, **kwargs)
    direct = direct[0] if isinstance(direct, (tuple, list)) else direct
    if op_name.endswith("_into"):  # returns out; the schema op returns the statistics
        assert public is kwargs["out"]
    else:
        assert torch.equal(public, direct)


@pytest.mark.parametrize("op_name", PUBLIC_OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_on_the_sample_call(backend, op_name):
    args, kwargs = PUBLIC_CALLS[op_name].sample(device_of(backend))
    opcheck(backend, op_name, args, kwargs)
