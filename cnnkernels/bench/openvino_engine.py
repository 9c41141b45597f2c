"""The OpenVINO baseline of cnnkernels-bench: the baseline (torchvision) model converted by
openvino.convert_model and compiled by OpenVINO's CPU plugin with the run's precision
(INFERENCE_PRECISION_HINT f32 / bf16 / f16) and torch's thread count; inference only.
Conversion and compilation happen at the first call, so they count in its time, as
torch.compile's do."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class Unavailable(RuntimeError):
    """The variant cannot run on this machine (a package or a device is missing)."""


def runner(model: nn.Module, device_type: str, dtype: torch.dtype, training: bool) -> Callable[[torch.Tensor],
                                                                                               torch.Tensor]:
    """x [N, 3, H, W] (float32 CPU) -> logits, through OpenVINO; compiled at the first call."""
    if device_type != "cpu":
        raise Unavailable(f"the openvino variant runs on cpu only, not {device_type}")
    if training:
        raise Unavailable("the openvino variant runs inference only")
    try:
        import openvino
    except ImportError as error:
        raise Unavailable(f"openvino is not installed ({error}); `pip install openvino` adds this baseline") from None
    model.eval()
    compiled = None

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal compiled
        if compiled is None:
            with torch.no_grad():
                converted = openvino.convert_model(model, example_input=x.float())
            compiled = openvino.Core().compile_model(converted, "CPU", {
                "INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype],
                "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        result = compiled(np.ascontiguousarray(x.float().numpy()))
        return torch.from_numpy(np.asarray(result[0]))
    return run
