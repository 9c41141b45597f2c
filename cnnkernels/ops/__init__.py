"""The public functional ops. Each is a registered torch op (schemas in cnnkernels/schemas.def)
with forward, backward, a fake implementation and four backends."""
from cnnkernels._backends import explain as _explain
from cnnkernels.ops import conv_bn_act as _conv_bn_act_module
from cnnkernels.ops.conv_bn_act import conv_bn_act
from cnnkernels.ops import add_act as _add_act_module
from cnnkernels.ops.add_act import add_act
from cnnkernels.ops import se_excite as _se_excite_module
from cnnkernels.ops.se_excite import se_excite
from cnnkernels.ops import bn_act_conv as _bn_act_conv_module
from cnnkernels.ops.bn_act_conv import bn_act_conv

_NORMALIZERS = {"conv_bn_act": _conv_bn_act_module._normalize_call}
_NORMALIZERS["add_act"] = _add_act_module._normalize_call
_NORMALIZERS["se_excite"] = _se_excite_module._normalize_call
_NORMALIZERS["bn_act_conv"] = _bn_act_conv_module._normalize_call
_NORMALIZERS["bn_act_conv_into"] = _bn_act_conv_module._normalize_into_call


def explain(op_name: str, *args, **kwargs) -> dict:
    """Which backend and kernel would run `cnnkernels.ops.<op_name>(*args, **kwargs)`, and
    why every other backend would not: {'op', 'backend', 'kernel', 'forced', 'rejected'}."""
    if op_name not in _NORMALIZERS:
        raise ValueError(f"unknown op {op_name!r}; known: {', '.join(sorted(_NORMALIZERS))}")
    return _explain(op_name, _NORMALIZERS[op_name](*args, **kwargs))


__all__ = ["conv_bn_act", "explain"]
__all__.append("add_act")
__all__ += ["se_excite"]
__all__ += ["bn_act_conv"]
