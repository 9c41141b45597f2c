"""Loads the compiled extension cnnkernels._C, which registers every op schema
(cnnkernels/schemas.def, through csrc/registration.cpp) and the C++ kernels. When it is missing or broken, it warns
once and defines the same public schemas from Python, so that the reference and
Triton backends still work."""
from __future__ import annotations

import importlib
import pathlib
import re
import warnings

import torch

SCHEMA_FILE = pathlib.Path(__file__).with_name("schemas.def")
_OP_LINE = re.compile(r'CNNKERNELS_OP\(\s*(\w+)\s*,\s*(\w+)\s*,((?:\s*"[^"]*")+)\s*\)')


def read_schemas(path: pathlib.Path = SCHEMA_FILE) -> dict[str, tuple[str, str]]:
    """{public op name: (native op name, schema)} from schemas.def, the file
    csrc/registration.cpp includes: every schema is written there once."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("//"))
    return {name: (native, "".join(re.findall(r'"([^"]*)"', literals)))
            for name, native, literals in _OP_LINE.findall(text)}


PUBLIC_SCHEMAS = {name: schema for name, (_, schema) in read_schemas().items()}

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
