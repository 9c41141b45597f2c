"""Loads the compiled extension cnnkernels._C, which registers every op schema
(csrc/registration.cpp) and the C++ kernels. When it is missing or broken, it warns
once and defines the same public schemas from Python, so that the reference and
Triton backends still work."""
from __future__ import annotations

import importlib
import warnings

import torch

# The public schemas as csrc/registration.cpp defines them (a test checks they agree).
PUBLIC_SCHEMAS = {
    "conv_bn_act": (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? running_mean, Tensor? running_var, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool training, float eps, Tensor? residual, "
        "str activation) -> (Tensor out, Tensor conv_out, Tensor save_mean, Tensor save_var)"
    ),
    "conv_bn_act_backward": (
        "(Tensor grad_out, Tensor out, Tensor x, Tensor weight, Tensor? bias, "
        "Tensor conv_out, Tensor? bn_weight, Tensor save_mean, Tensor save_var, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool training, "
        "float eps, str activation, bool[6] output_mask) -> (Tensor grad_x, "
        "Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias, "
        "Tensor grad_residual)"
    ),
    "add_act": "(Tensor x, Tensor residual, str activation) -> Tensor",
    "add_act_backward": "(Tensor grad_out, Tensor out, str activation) -> Tensor",
    "se_excite": (
        "(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "Tensor? residual, str activation) -> (Tensor out, Tensor squeezed, Tensor hidden, "
        "Tensor gate)"
    ),
    "se_excite_backward": (
        "(Tensor grad_out, Tensor out, Tensor x, Tensor fc1_weight, Tensor fc2_weight, "
        "Tensor squeezed, Tensor hidden, Tensor gate, str activation, bool[6] output_mask) -> "
        "(Tensor grad_x, Tensor grad_fc1_weight, Tensor grad_fc1_bias, Tensor grad_fc2_weight, "
        "Tensor grad_fc2_bias, Tensor grad_residual)"
    ),
}
_BN_ACT_CONV_ARGS = (
    "Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor? running_mean, Tensor? running_var, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, bool training, float eps, str activation"
)
PUBLIC_SCHEMAS["bn_act_conv"] = f"({_BN_ACT_CONV_ARGS}) -> (Tensor out, Tensor save_mean, Tensor save_var)"
PUBLIC_SCHEMAS["bn_act_conv_into"] = f"(Tensor(a!) out, {_BN_ACT_CONV_ARGS}) -> (Tensor save_mean, Tensor save_var)"
PUBLIC_SCHEMAS["bn_act_conv_backward"] = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor save_mean, Tensor save_var, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, bool training, float eps, str activation, "
    "bool[5] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
    "Tensor grad_bn_weight, Tensor grad_bn_bias)"
)

LOAD_ERROR: str | None = None
_fallback_library: torch.library.Library | None = None

try:
    importlib.import_module("cnnkernels._C")  # importing registers the ops
except Exception as error:  # any failure to load means: run without the C++ backends
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"cnnkernels: the compiled extension cnnkernels._C could not be loaded ({LOAD_ERROR}); "
        "the cpu and cuda backends are unavailable, the reference and Triton backends still work. "
        "Rebuild with `pip install .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )
    _fallback_library = torch.library.Library("cnnkernels", "DEF")
    for _name, _schema in PUBLIC_SCHEMAS.items():
        _fallback_library.define(_name + _schema)
else:
    # An extension built from older sources lacks the newer ops: define their public
    # schemas here, so that their reference and Triton backends still work.
    _missing = {n: s for n, s in PUBLIC_SCHEMAS.items() if not hasattr(torch.ops.cnnkernels, n)}
    if _missing:
        warnings.warn(f"cnnkernels._C predates the ops {', '.join(_missing)}: their cpu and cuda "
                      "backends are unavailable until it is rebuilt", RuntimeWarning, stacklevel=2)
        _fallback_library = torch.library.Library("cnnkernels", "FRAGMENT")
        for _name, _schema in _missing.items():
            _fallback_library.define(_name + _schema)


def extension_loaded() -> bool:
    return LOAD_ERROR is None


def built_with_cuda() -> bool:
    return extension_loaded() and bool(torch.ops.cnnkernels._built_with_cuda())


def has_native_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the C++ extension registered a kernel of cnnkernels::<op_name> for the key."""
    if not extension_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkernels::{op_name}", dispatch_key)
