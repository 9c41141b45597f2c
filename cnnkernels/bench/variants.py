"""The ways cnnkernels-bench runs a model (its --variants)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """How a model runs: role "baseline" (the architecture's baseline model) or "ours";
    compile_mode None for eager, else torch.compile's mode ("default", "max-autotune"),
    with Inductor `compile_options` (e.g. freezing); freeze: ours with
    cnnkernels.nn.freeze applied (it changes CPU inference only: float32/float64, and
    float32/bfloat16 in channels_last on oneDNN's prepacked path; elsewhere the model runs
    as the unfrozen variant); engine "openvino": the baseline model
    converted and compiled by OpenVINO's CPU plugin (inference only)."""
    name: str
    role: str
    compile_mode: str | None
    label: str
    freeze: bool = False
    compile_options: dict = field(default_factory=dict)
    engine: str = "torch"


VARIANTS = {v.name: v for v in (
    Variant("eager", "baseline", None, "baseline eager"),
    Variant("compile", "baseline", "default", "baseline torch.compile"),
    Variant("compile-freezing", "baseline", "default", "baseline torch.compile, Inductor freezing",
            compile_options={"freezing": True}),
    Variant("compile-max-autotune", "baseline", "max-autotune", "baseline torch.compile max-autotune"),
    Variant("openvino", "baseline", None, "baseline OpenVINO CPU plugin", engine="openvino"),
    Variant("cnnkernels", "ours", None, "cnnkernels eager"),
    Variant("cnnkernels-frozen", "ours", None, "cnnkernels eager, frozen (BN folded once)", freeze=True),
    Variant("cnnkernels-compile", "ours", "default", "cnnkernels + torch.compile"),
)}
BASELINE_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.role == "baseline")
