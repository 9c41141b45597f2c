"""The public functional ops. Each is a registered torch op (schemas in cnnkernels/schemas.def)
with forward, backward, a fake implementation and four backends, declared in its own module
cnnkernels/ops/<op>.py, which defines the function <op> and declares how it is called and
what it costs (ops/_registration.declare_call); explain(), info, analysis and the bench's
traffic tables read those declarations. Every module here not starting with "_" is an op
and is imported below, so a new op needs no line in this file."""
import importlib
import pkgutil

from cnnkernels._backends import explain as _explain
from cnnkernels.ops import _registration

__all__ = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _name in __all__:
    globals()[_name] = getattr(importlib.import_module(f"{__name__}.{_name}"), _name)
__all__.append("explain")


def explain(op_name: str, *args, **kwargs) -> dict:
    """Which backend and kernel would run `cnnkernels.ops.<op_name>(*args, **kwargs)`, and
    why every other backend would not: {'op', 'backend', 'kernel', 'forced', 'rejected'}."""
    calls = _registration.PUBLIC_CALLS
    if op_name not in calls:
        raise ValueError(f"unknown op {op_name!r}; known: {', '.join(sorted(calls))}")
    return _explain(op_name, calls[op_name].normalize(*args, **kwargs))
