"""The public functional ops. Each is a registered torch op (schemas in cnnkernels/schemas.def)
with forward, backward, a fake implementation and four backends; each op file declares
how it is called (ops/_registration.declare_call), which explain() and info read."""
from cnnkernels._backends import explain as _explain
from cnnkernels.ops import _registration
from cnnkernels.ops.add_act import add_act
from cnnkernels.ops.bn_act_conv import bn_act_conv
from cnnkernels.ops.conv_bn_act import conv_bn_act
from cnnkernels.ops.se_excite import se_excite


def explain(op_name: str, *args, **kwargs) -> dict:
    """Which backend and kernel would run `cnnkernels.ops.<op_name>(*args, **kwargs)`, and
    why every other backend would not: {'op', 'backend', 'kernel', 'forced', 'rejected'}."""
    calls = _registration.PUBLIC_CALLS
    if op_name not in calls:
        raise ValueError(f"unknown op {op_name!r}; known: {', '.join(sorted(calls))}")
    return _explain(op_name, calls[op_name].normalize(*args, **kwargs))


__all__ = ["add_act", "bn_act_conv", "conv_bn_act", "se_excite", "explain"]
