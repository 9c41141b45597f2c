"""Per-op speed for `make gpu-check`: every cnnkernels op on the real layer shapes of
ResNet-50, ResNeXt-50, SE-ResNeXt-50 and DenseNet-121 (cnnkernels/bench/layers.py),
forward ("eval") and forward + backward ("train"), against the unfused torch sequence
eager (cuDNN, cudnn.benchmark on) and under torch.compile, channels_last; grouped
convolutions also against cuDNN on NCHW data.

Timing: CUDA events around each call (perf_counter on CPU), after warm-up calls; the
median and quartiles of the timed calls. Every variant's output is compared with the
eager sequence's before it is timed. Cheap variants run first for every layer, then
torch.compile per layer while --deadline allows, so a run cut short still has the
core ratios. The JSON is rewritten after every measurement.

    python3 benches/gpu_check_ops.py --out ops.json --deadline $(( $(date +%s) + 120 ))
    python3 benches/gpu_check_ops.py --device cpu --dry-run --out ops.json   # CPU stand-in
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from cnnkernels.bench.layers import LAYERS, build, explain_fused, run_fused  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("eval", "train")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(fn, inputs, mode, grad_targets, device):
    """One call: forward under no_grad (eval), or forward + autograd.grad of every target
    with a fixed random grad_out (train)."""
    grad_out = []

    def step():
        if mode == "eval":
            with torch.no_grad():
                return fn(*inputs)
        out = fn(*inputs)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        torch.autograd.grad(out, grad_targets, grad_out[0])
        return out
    return step


def time_step(step, device: str, warmup: int, reps: int) -> dict:
    """Median / quartiles in milliseconds of `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    if device.startswith("cuda"):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(reps):
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    times.sort()
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": quartiles[0], "q3_ms": quartiles[2], "reps": reps}


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def variants_of(layer, backends) -> list[str]:
    names = ["torch_eager"] + (["torch_eager_nchw"] if layer.groups > 1 else []) + [f"ours_{b}" for b in backends]
    return names


def measure(layer, mode: str, variant: str, args) -> dict:
    """One row: the variant's timing, first-call time, kernel and error against eager."""
    dtype, device = DTYPES[args.dtype], args.device
    fmt = torch.contiguous_format if variant.endswith("_nchw") else torch.channels_last
    module, inputs = build(layer, mode, args.batch, dtype, device, fmt)
    grad_targets = [t for t in inputs if t.requires_grad] + list(module.parameters())
    with torch.no_grad():
        expected = copy.deepcopy(module)(*inputs)
    row = {"layer": layer.id, "op": layer.op, "source": layer.source, "mode": mode, "variant": variant}
    if variant.startswith("torch_compile"):
        torch._dynamo.reset()
        fn = torch.compile(module)
    elif variant.startswith("ours_"):
        backend = variant.removeprefix("ours_")
        verdict = explain_fused(module, *inputs, backend=backend)
        row["kernel"] = verdict["kernel"]
        if backend in verdict["rejected"]:
            return {**row, "status": "declined", "error": "; ".join(verdict["rejected"][backend])}

        def fn(*xs):
            return run_fused(module, *xs, backend=backend)
    else:
        fn = module
    step = make_step(fn, inputs, mode, grad_targets, device)
    begin = time.perf_counter()
    out = step()
    _sync(device)
    row["first_call_s"] = round(time.perf_counter() - begin, 4)
    row["rel_err_vs_eager"] = rel_err(out, expected)
    bound = 1e-3 if dtype == torch.float32 else 3e-2
    row.update(time_step(step, device, args.warmup, args.reps))
    row["status"] = "ok" if row["rel_err_vs_eager"] < bound else "mismatch"
    return row


def default_choices(layer, args) -> dict:
    """The backend and kernel cnnkernels picks by default for the layer, per mode."""
    choice = {}
    for mode in MODES:
        module, inputs = build(layer, mode, args.batch, DTYPES[args.dtype], args.device)
        verdict = explain_fused(module, *inputs)
        choice[mode] = {"backend": verdict["backend"], "kernel": verdict["kernel"]}
    return choice


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
    parser.add_argument("--deadline", type=float, default=None, help="stop starting measurements after this time "
                                                                    "(seconds since the epoch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU stand-in: one layer per op, spatial size cut to 8, batch 2, one timed call, "
                             "torch.compile of the first layer only")
    args = parser.parse_args(argv)
    backends = ("cuda", "triton") if args.device.startswith("cuda") else ("cpu",)
    layers, compile_layers = list(LAYERS), list(LAYERS)
    if args.dry_run:
        firsts = {}
        for layer in LAYERS:
            firsts.setdefault(layer.op, dataclasses.replace(layer, size=min(layer.size, 8)))
        layers = list(firsts.values())
        compile_layers = layers[:1]
        args.batch, args.warmup, args.reps = 2, 1, 1
    torch.backends.cudnn.benchmark = args.device.startswith("cuda")
    document = {"settings": {"device": args.device, "batch": args.batch, "dtype": args.dtype,
                             "memory_format": "channels_last (torch_eager_nchw: NCHW)", "warmup": args.warmup,
                             "reps": args.reps, "dry_run": args.dry_run, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                             "timing": "CUDA events per call" if args.device.startswith("cuda") else "perf_counter"},
                "defaults": {}, "rows": []}

    def save():
        args.out.write_text(json.dumps(document, indent=1))

    work = [(layer, mode, v) for layer in layers for mode in MODES for v in variants_of(layer, backends)]
    work += [(layer, mode, "torch_compile") for layer in compile_layers for mode in MODES
             if not (args.dry_run and mode == "train")]
    for layer in layers:
        try:
            document["defaults"][layer.id] = default_choices(layer, args)
        except Exception as error:
            document["defaults"][layer.id] = {"error": f"{type(error).__name__}: {error}"}
    for index, (layer, mode, variant) in enumerate(work):
        label = f"[{index + 1}/{len(work)}] {layer.id} {mode} {variant}"
        if args.deadline is not None and time.time() > args.deadline:
            document["rows"].append({"layer": layer.id, "op": layer.op, "source": layer.source, "mode": mode,
                                     "variant": variant, "status": "skipped", "error": "out of time"})
            continue
        try:
            row = measure(layer, mode, variant, args)
        except Exception as error:  # recorded; the next measurement still runs
            row = {"layer": layer.id, "op": layer.op, "source": layer.source, "mode": mode, "variant": variant,
                   "status": "error", "error": f"{type(error).__name__}: {error}"[:2000]}
        document["rows"].append(row)
        save()
        timing = f"{row['median_ms']:.3f} ms" if "median_ms" in row else row.get("error", "")[:200]
        print(f"{label}: {row['status']} {timing}", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    save()
    skipped = sum(r["status"] == "skipped" for r in document["rows"])
    bad = [r for r in document["rows"] if r["status"] in ("error", "mismatch")]
    print(f"op-speed done: {len(document['rows'])} rows, {len(bad)} failed, {skipped} skipped for time", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
