"""A short run of every kernel family of the cuda backend (then the triton backend), for
`compute-sanitizer --tool memcheck` to watch: each op on one layer shape per kernel it
picks (cnnkernels/bench/layers.py, spatial size cut to 9), forward and backward, train and
eval, float32 / bfloat16, channels_last and NCHW. One line per run, flushed, so a run cut
short by its time limit still shows what was covered.

    compute-sanitizer --tool memcheck python3 benches/gpu_check_sanitize.py
    python3 benches/gpu_check_sanitize.py --device cpu --backends cpu   # the CPU stand-in
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from cnnkernels.bench.layers import LAYERS, build, explain_fused, run_fused  # noqa: E402

# one layer per kernel the cuda backend picks: cuDNN + epilogue (stem, strided 1x1, NCHW),
# 1x1 GEMM, grouped 3x3, and one of each other op
FAMILY_LAYERS = (
    "conv_bn_act-resnet50-conv1", "conv_bn_act-resnet50-layer1.1.conv3", "conv_bn_act-resnet50-layer2.0.downsample",
    "conv_bn_act-resnet50-layer2.1.conv2", "conv_bn_act-resnext50_32x4d-layer1.1.conv2",
    "add_act-resnet50-layer3.1", "se_excite-seresnext50_32x4d-layer3.1.se",
    "bn_act_conv-densenet121-denseblock1.denselayer6.norm1/relu1/conv1",
    "bn_act_conv-densenet121-denseblock1.denselayer1.norm2/relu2/conv2",
)
FORMATS = {"fp32-cl": (torch.float32, torch.channels_last), "bf16-cl": (torch.bfloat16, torch.channels_last),
           "fp32-nchw": (torch.float32, torch.contiguous_format)}


def run_once(layer, backend: str, dtype, memory_format, mode: str, device: str, size: int) -> str:
    """One forward + backward of layer's op on backend; returns the kernel it ran."""
    layer = dataclasses.replace(layer, size=min(layer.size, size))
    module, inputs = build(layer, mode, 2, dtype, device, memory_format)
    inputs = [t.detach().requires_grad_(layer.input_grad or i > 0) for i, t in enumerate(inputs)]
    verdict = explain_fused(module, *inputs, backend=backend)
    if backend in verdict["rejected"]:
        return "declined: " + "; ".join(verdict["rejected"][backend])
    out = run_fused(module, *inputs, backend=backend)
    leaves = [t for t in inputs if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if not all(torch.isfinite(t).all() for t in (out, *grads)):
        raise RuntimeError("non-finite output or gradient")
    return verdict["kernel"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated, in order")
    parser.add_argument("--size", type=int, default=9, help="largest spatial size (default 9)")
    parser.add_argument("--layers", type=int, default=len(FAMILY_LAYERS), help="the first N family layers")
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    by_id = {layer.id: layer for layer in LAYERS}
    failures = 0
    start = time.perf_counter()
    for backend in args.backends.split(","):
        for layer_id in FAMILY_LAYERS[:args.layers]:
            for fmt in args.formats.split(","):
                for mode in ("train", "eval"):
                    label = f"{backend} {layer_id} {fmt} {mode}"
                    try:
                        kernel = run_once(by_id[layer_id], backend, *FORMATS[fmt], mode, args.device, args.size)
                        print(f"sanitize-run ok {label}: {kernel} ({time.perf_counter() - start:.1f} s)", flush=True)
                    except Exception as error:  # reported, and the next family still runs
                        failures += 1
                        print(f"sanitize-run FAILED {label}: {type(error).__name__}: {error}", flush=True)
    print(f"sanitize-runs done: {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
