"""What `make gpu-check` writes: gpu-check.json (everything), gpu-check.md (tables a
person reads), op-speed.png and models.png, and the short summary printed last."""
from __future__ import annotations

import json
import math
import pathlib

OPS_VARIANTS = ("torch_eager", "torch_eager_nchw", "torch_compile", "ours_cuda", "ours_triton", "ours_cpu")
MODEL_VARIANTS = ("eager", "compile", "cnnkernels")


def _f(value, spec=".2f", missing="-"):
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _short(kernel) -> str | None:
    """A kernel's name without its description ('conv1x1_gemm: SIMT GEMM ...' -> 'conv1x1_gemm')."""
    return kernel.split(":")[0] if isinstance(kernel, str) else kernel


def _table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def op_speed_rows(stage: dict) -> list[dict]:
    """One dict per (layer, mode): median ms of each variant, ratios against eager and
    compile (above 1: ours faster), the default backend and whether it loses to eager."""
    grouped: dict[tuple, dict] = {}
    for row in stage.get("rows", []):
        key = (row["layer"], row["mode"])
        entry = grouped.setdefault(key, {"layer": row["layer"], "source": row.get("source", ""), "op": row["op"],
                                         "mode": row["mode"], "ms": {}, "status": {}, "kernel": {}})
        entry["status"][row["variant"]] = row["status"]
        if row["status"] == "ok":
            entry["ms"][row["variant"]] = row["median_ms"]
        if row.get("kernel"):
            entry["kernel"][row["variant"]] = row["kernel"]
    out = []
    for (layer, mode), entry in grouped.items():
        ms = entry["ms"]
        eager, compiled = ms.get("torch_eager"), ms.get("torch_compile")
        ours = {v: t for v, t in ms.items() if v.startswith("ours_")}
        entry["vs_eager"] = {v: eager / t for v, t in ours.items() if eager}
        entry["vs_compile"] = {v: compiled / t for v, t in ours.items() if compiled}
        default = stage.get("defaults", {}).get(layer, {}).get(mode, {})
        entry["default_backend"], entry["default_kernel"] = default.get("backend"), default.get("kernel")
        chosen = ms.get(f"ours_{entry['default_backend']}")
        entry["default_vs_eager"] = eager / chosen if eager and chosen else None
        entry["best_backend"] = min(ours, key=ours.get).removeprefix("ours_") if ours else None
        out.append(entry)
    return out


def model_rows(stage: dict) -> list[dict]:
    """One dict per (model, mode): images/s and peak memory of each variant, ratios."""
    grouped: dict[tuple, dict] = {}
    for record in stage.get("records", []):
        entry = grouped.setdefault((record["model"], record["mode"]),
                                   {"model": record["model"], "mode": record["mode"], "ips": {}, "peak_gib": {},
                                    "first_s": {}, "status": {}})
        entry["status"][record["variant"]] = record.get("status")
        if record.get("status") == "ok":
            entry["ips"][record["variant"]] = record["images_per_s"]
            entry["peak_gib"][record["variant"]] = record["memory"]["peak_bytes"] / 2**30
            entry["first_s"][record["variant"]] = record["first_call_s"]
    for entry in grouped.values():
        ips = entry["ips"]
        entry["ours_vs_eager"] = ips["cnnkernels"] / ips["eager"] if "cnnkernels" in ips and "eager" in ips else None
        entry["ours_vs_compile"] = (ips["cnnkernels"] / ips["compile"] if "cnnkernels" in ips and "compile" in ips
                                    else None)
    return list(grouped.values())


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = [f"# gpu-check{' (dry run: CPU stand-ins)' if result.get('dry_run') else ''}", "",
             f"- device: {env.get('gpu', 'no GPU')} (capability {env.get('gpu_capability', '-')}, "
             f"{env.get('sms', '-')} SMs), {env.get('cores')} CPU cores",
             f"- torch {env.get('torch')} (CUDA {env.get('cuda_build')}, cuDNN {env.get('cudnn')}), "
             f"triton {env.get('triton')}, torchvision {env.get('torchvision')}, {env.get('nvcc', 'no nvcc')}, "
             f"python {env.get('python')}",
             f"- commit {env.get('commit')}{' (with uncommitted changes)' if env.get('dirty') else ''}; "
             f"started {result.get('started')}; {result.get('seconds', '?')} s of {result.get('total_budget_s')} s",
             "", "## Stages", ""]
    rows = [[name, s.get("status"), s.get("seconds", "-"), s.get("why") or s.get("error") or ""]
            for name, s in result.get("stages", {}).items()]
    lines += _table(["stage", "status", "seconds", "note"], rows)
    stages = result.get("stages", {})
    build = stages.get("build", {})
    if build.get("build_s") is not None:
        lines += ["", f"Build: {build['status']} in {build['build_s']} s for sm_{build['arch'].replace('.', '')} "
                      f"with {build['jobs']} jobs."]
    tests = stages.get("tests", {})
    if "tests" in tests:
        lines += ["", "## GPU tests", "",
                  f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} "
                  f"skipped (of {tests['tests']}); junit XML in gpu-tests.xml."]
        for failed in tests.get("failed_tests", [])[:60]:
            lines.append(f"- FAILED `{failed['test']}`: {failed['message'][:300]}")
    sanitize = stages.get("sanitize", {})
    if "runs_ok" in sanitize:
        lines += ["", "## compute-sanitizer memcheck", "",
                  f"{sanitize['runs_ok']} runs ok, {sanitize['runs_failed']} failed; "
                  f"{sanitize.get('error_summary') or 'no ERROR SUMMARY line'}; full output in sanitizer.log."]
    ops = op_speed_rows(stages.get("op-speed", {}))
    if ops:
        settings = stages["op-speed"].get("settings", {})
        lines += ["", "## Per-op speed", "",
                  f"batch {settings.get('batch')}, {settings.get('dtype')}, {settings.get('memory_format')}, "
                  f"{settings.get('timing')}, median of {settings.get('reps')} after {settings.get('warmup')} warm-up. "
                  "Ratios: baseline ms / ours ms (above 1: ours faster). 'default': the backend cnnkernels picks "
                  "unforced; '!' marks a default slower than cuDNN eager.", ""]
        variants = [v for v in OPS_VARIANTS if any(v in e["ms"] for e in ops)]
        ours = [v for v in variants if v.startswith("ours_")]
        headers = (["layer", "mode"] + [f"{v} ms" for v in variants] + [f"{v[5:]} vs eager" for v in ours]
                   + [f"{v[5:]} vs compile" for v in ours] + ["default (kernel)", "default vs eager"])
        rows = []
        for e in ops:
            flag = " !" if e["default_vs_eager"] is not None and e["default_vs_eager"] < 1 else ""
            rows.append([e["layer"], e["mode"]] + [_f(e["ms"].get(v), ".3f") for v in variants]
                        + [_f(e["vs_eager"].get(v)) for v in ours] + [_f(e["vs_compile"].get(v)) for v in ours]
                        + [f"{e['default_backend']} ({_short(e['default_kernel'])})", _f(e["default_vs_eager"]) + flag])
        lines += _table(headers, rows)
        bad = [r for r in stages["op-speed"].get("rows", []) if r["status"] not in ("ok",)]
        for r in bad[:40]:
            lines.append(f"- {r['status']}: {r['layer']} {r['mode']} {r['variant']}: {r.get('error', '')[:300]}"
                         + (f" (rel err {r['rel_err_vs_eager']:.2e})" if "rel_err_vs_eager" in r else ""))
    models = model_rows(stages.get("models", {}))
    if models:
        lines += ["", "## Models", "", stages["models"].get("settings", ""), ""]
        headers = (["model", "mode"] + [f"{v} img/s" for v in MODEL_VARIANTS] + ["ours vs eager", "ours vs compile"]
                   + [f"{v} peak GiB" for v in MODEL_VARIANTS] + ["ours first call s"])
        rows = [[e["model"], e["mode"]] + [_f(e["ips"].get(v), ".1f") for v in MODEL_VARIANTS]
                + [_f(e["ours_vs_eager"]), _f(e["ours_vs_compile"])]
                + [_f(e["peak_gib"].get(v)) for v in MODEL_VARIANTS] + [_f(e["first_s"].get("cnnkernels"))]
                for e in models]
        lines += _table(headers, rows)
        for record in stages["models"].get("records", []):
            if record.get("status") != "ok":
                lines.append(f"- {record['model']} {record['mode']} {record['variant']}: {record.get('error', '')}")
        for skipped in stages["models"].get("skipped", []):
            lines.append(f"- skipped: {skipped}")
    return "\n".join(lines) + "\n"


def plot_ops(result: dict, path: pathlib.Path) -> pathlib.Path | None:
    rows = [e for e in op_speed_rows(result.get("stages", {}).get("op-speed", {})) if e["vs_eager"]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    backends = sorted({v for e in rows for v in e["vs_eager"]})
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) * max(1, len(backends)) / 1.5 + 1.8))
    height = 0.8 / len(backends)
    for b_index, backend in enumerate(backends):
        ys = [i + (b_index - (len(backends) - 1) / 2) * height for i in range(len(rows))]
        ax.barh(ys, [e["vs_eager"].get(backend, 0) for e in rows], height, label=backend.removeprefix("ours_"))
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{e['layer']} {e['mode']}" for e in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the unfused torch sequence, eager (cuDNN); above 1: ours faster")
    ax.legend(fontsize=7)
    ax.set_title("cnnkernels per-op speed (gpu-check)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_models(result: dict, path: pathlib.Path) -> pathlib.Path | None:
    rows = [e for e in model_rows(result.get("stages", {}).get("models", {})) if e["ips"]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(e["mode"] for e in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    width = 0.8 / len(MODEL_VARIANTS)
    for ax, mode in zip(axes[0], modes):
        entries = [e for e in rows if e["mode"] == mode]
        for v_index, variant in enumerate(MODEL_VARIANTS):
            xs = [i + (v_index - 1) * width for i in range(len(entries))]
            ax.bar(xs, [e["ips"].get(variant, 0) for e in entries], width, label=variant)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([e["model"] for e in entries], fontsize=8)
        ax.set_ylabel("images/s (median)")
        ax.set_title(mode, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict, out: pathlib.Path, plots: bool) -> list[pathlib.Path]:
    """gpu-check.json and gpu-check.md, and the plots when asked; returns the paths."""
    paths = [out / "gpu-check.json", out / "gpu-check.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str))
    paths[1].write_text(markdown(result))
    if plots:
        for plot, name in ((plot_ops, "op-speed.png"), (plot_models, "models.png")):
            try:
                made = plot(result, out / name)
            except Exception as error:  # a plot must not cost the figures
                print(f"gpu-check: {name} not drawn: {type(error).__name__}: {error}", flush=True)
                made = None
            if made is not None:
                paths.append(made)
    return paths


def summary(result: dict) -> str:
    """The short table printed last (the device tool returns the end of the output)."""
    lines = ["", "gpu-check summary:"]
    for name, stage in result.get("stages", {}).items():
        detail = ""
        if name == "tests" and "tests" in stage:
            detail = f"{stage['passed']} passed, {stage['failures'] + stage['errors']} failed, {stage['skipped']} skipped"
        elif name == "sanitize" and "runs_ok" in stage:
            detail = f"{stage['runs_ok']} runs, {stage.get('error_summary')}"
        elif name == "op-speed":
            rows = op_speed_rows(stage)
            losing = [r for r in rows if r["default_vs_eager"] is not None and r["default_vs_eager"] < 1]
            detail = f"{len(rows)} layer/mode rows, default slower than eager in {len(losing)}"
        elif name == "models":
            detail = "; ".join(f"{e['model']} {e['mode']} ours/eager {_f(e['ours_vs_eager'])} "
                               f"ours/compile {_f(e['ours_vs_compile'])}" for e in model_rows(stage))
        elif name == "build" and stage.get("build_s") is not None:
            detail = f"{stage['build_s']} s"
        lines.append(f"  {name:<9} {stage.get('status', '?'):<10} {stage.get('seconds', '-')!s:>6} s  {detail}")
    return "\n".join(lines)
