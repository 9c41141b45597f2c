"""Peak training memory and time per step of DenseNet: torchvision (memory_efficient False
and True) against cnnkernels (DenseBlock, concatenation in place; memory_efficient
True and False), for DenseNet-121 and over the depth of a small DenseNet.

A plain script (not a pytest-benchmark suite):

    python benches/bench_densenet_memory.py --out DIR [--device cpu|cuda] [--batch 8]
        [--size 64] [--depths 4 8 16 24 32] [--sweep-batch 8] [--sweep-size 64] [--steps 5]

writes DIR/densenet_memory.json and DIR/densenet_memory.png (memory and time against
depth). One training step is forward + backward of the summed logits with random
weights and inputs (train mode, float32, contiguous).

Memory per variant and model:
  cuda: peak_bytes = torch.cuda.max_memory_allocated() over one step, less the memory
        allocated before it (weights, inputs): what the step itself needs at its peak.
  cpu:  saved_bytes = the bytes autograd keeps for backward at the end of the forward
        (every tensor packed by torch.autograd.graph.saved_tensors_hooks, counted once
        per storage, parameters excluded; DenseBlock's feature buffers are among them);
        peak_bytes = the most bytes held at once by the step's allocations through the
        CPU allocator (torch.profiler memory events, cnnkernels.bench.memory), which adds
        what backward allocates (gradient buffers, recomputed bottlenecks).
Time: the median over --steps rounds; the variants take turns within each round, so a
load change on a shared machine hits all of them alike.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
import torchvision

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run against the source tree without an install
    sys.path.insert(0, str(ROOT))

VARIANTS = ("torchvision", "torchvision_memory_efficient", "ours_memory_efficient", "ours")


def _models_package():
    from cnnkernels.bench.architectures import models_module
    return models_module()


def build(variant: str, growth_rate: int, block_config, num_init_features: int, state=None):
    """The variant's DenseNet (10 classes); all variants get the same weights."""
    memory_efficient = variant.endswith("memory_efficient")
    kwargs = dict(growth_rate=growth_rate, block_config=tuple(block_config), num_init_features=num_init_features,
                  num_classes=10, memory_efficient=memory_efficient)
    if variant.startswith("torchvision"):
        model = torchvision.models.DenseNet(**kwargs)
    else:
        model = _models_package().densenet.DenseNet(**kwargs)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.train()


def _step(model, x):
    model(x).sum().backward()
    for p in model.parameters():
        p.grad = None


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward after model(x), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    total = sum(seen.values())
    out.sum().backward()
    for p in model.parameters():
        p.grad = None
    return total


def peak_bytes(model, x) -> int:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(model, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from cnnkernels.bench.memory import profiled_peak_bytes
    return profiled_peak_bytes(lambda: _step(model, x))


def _timed(model, x) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(model, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(variants, config: dict, batch: int, size: int, steps: int, device: str) -> dict:
    """Memory and median step time of every variant for one DenseNet configuration."""
    torch.manual_seed(0)
    reference = build("torchvision", **config)
    state = reference.state_dict()
    models = {v: build(v, **config, state=state).to(device) for v in variants}
    x = torch.randn(batch, 3, size, size, device=device)
    results = {}
    for name, model in models.items():
        _step(model, x)  # warm-up
        results[name] = {"peak_bytes": peak_bytes(model, x)}
        if device == "cpu":
            results[name]["saved_bytes"] = saved_bytes(model, x)
        results[name]["times_s"] = []
    for _ in range(steps):
        for name, model in models.items():
            results[name]["times_s"].append(_timed(model, x))
    for result in results.values():
        result["time_s"] = statistics.median(result["times_s"])
    return results


def plot(sweep: list[dict], path: pathlib.Path) -> None:
    """Memory (saved for backward on CPU, then peak) and step time against depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("saved_bytes", "peak_bytes") if key in next(iter(sweep[0]["results"].values()))]
    panels.append("time_s")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    labels = {"saved_bytes": "held for backward (MiB)", "peak_bytes": "peak of one step (MiB)",
              "time_s": "time per training step (ms)"}
    depths = [row["depth"] for row in sweep]
    for ax, key in zip(axes, panels):
        scale = 1e3 if key == "time_s" else 2 ** -20
        for variant in sweep[0]["results"]:
            ax.plot(depths, [row["results"][variant][key] * scale for row in sweep], "o-", label=variant)
        ax.set_xlabel("network depth (conv layers)")
        ax.set_ylabel(labels[key])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("DenseNet training: memory and time against depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="DenseNet-121 batch size")
    parser.add_argument("--size", type=int, default=64, help="DenseNet-121 input height and width")
    parser.add_argument("--sweep-batch", type=int, default=8)
    parser.add_argument("--sweep-size", type=int, default=64)
    parser.add_argument("--sweep-growth", type=int, default=12)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 24, 32],
                        help="layers per dense block of the 3-block sweep network")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_key = "saved_bytes" if args.device == "cpu" else "peak_bytes"

    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "dtype": "float32", "memory_format": "contiguous", "steps": args.steps, "memory_key": memory_key,
        "method": __doc__.split("Memory per variant and model:")[1].strip(),
    }
    config121 = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
    print(f"densenet121 batch {args.batch} at {args.size}x{args.size} on {args.device}", flush=True)
    report["densenet121"] = {"batch": args.batch, "size": args.size,
                             "results": measure(args.variants, config121, args.batch, args.size, args.steps,
                                                args.device)}
    _print(report["densenet121"]["results"], memory_key)

    report["sweep"] = []
    for depth in args.depths:
        config = dict(growth_rate=args.sweep_growth, block_config=(depth,) * 3, num_init_features=2 * args.sweep_growth)
        conv_layers = 2 * 3 * depth + 2 + 1  # dense layers, 2 transitions, stem
        print(f"sweep: 3 blocks x {depth} layers (depth {conv_layers}), k={args.sweep_growth}, "
              f"batch {args.sweep_batch} at {args.sweep_size}x{args.sweep_size}", flush=True)
        results = measure(args.variants, config, args.sweep_batch, args.sweep_size, args.steps, args.device)
        _print(results, memory_key)
        report["sweep"].append({"layers_per_block": depth, "depth": conv_layers, "results": results})
    report["sweep_config"] = {"growth_rate": args.sweep_growth, "num_init_features": 2 * args.sweep_growth,
                              "batch": args.sweep_batch, "size": args.sweep_size}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "densenet_memory.json").write_text(json.dumps(report, indent=2))
    plot(report["sweep"], args.out / "densenet_memory.png")
    print(f"wrote {args.out / 'densenet_memory.json'} and {args.out / 'densenet_memory.png'}")
    return report


def _print(results: dict, memory_key: str) -> None:
    base = results.get("torchvision")
    for name, r in results.items():
        line = f"  {name:30s} {memory_key} {r[memory_key] / 2 ** 20:8.1f} MiB"
        if "saved_bytes" in r and memory_key != "peak_bytes":
            line += f"  peak {r['peak_bytes'] / 2 ** 20:8.1f} MiB"
        line += f"  step {r['time_s'] * 1e3:8.1f} ms"
        if base is not None:
            line += (f"  (x{r[memory_key] / base[memory_key]:.2f} memory, "
                     f"x{r['time_s'] / base['time_s']:.2f} time vs torchvision)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
