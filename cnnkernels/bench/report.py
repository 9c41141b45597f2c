"""Reporting a benchmark document (harness.run's result): a terminal table with speedup
columns against each baseline, the JSON file with every figure, and a PNG bar chart."""
from __future__ import annotations

import json
import math
import pathlib
import time

from cnnkernels.bench.variants import BASELINE_VARIANTS

MIB = 2 ** 20
SPEEDUP_HEADER = {"eager": "x eager", "compile": "x compile", "compile-max-autotune": "x max-autotune"}


def config_key(record: dict) -> tuple:
    """What makes a configuration: device, batch, image size, dtype, memory format, mode."""
    return (record["device"], record["batch_size"], record["image_size"], record["dtype"],
            record["memory_format"], record["mode"])


def config_title(record: dict) -> str:
    """One line naming a configuration."""
    return (f"{record['mode']}, {record['dtype']}, {record['memory_format']}, batch {record['batch_size']}, "
            f"{record['image_size']}x{record['image_size']}, {record['device']}")


def grouped(document: dict) -> dict[tuple, list[dict]]:
    """The results grouped by configuration, in run order."""
    groups: dict[tuple, list[dict]] = {}
    for record in document["results"]:
        groups.setdefault(config_key(record), []).append(record)
    return groups


def _speedup_columns(document: dict) -> list[str]:
    present = {r["variant"] for r in document["results"]}
    return [name for name in BASELINE_VARIANTS if name in present]


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _speedup_cell(record: dict, baseline: str) -> str:
    """The ratio of medians, and on cpu the 95% interval of the per-round paired ratios."""
    cell = _fmt(record["speedup"].get(baseline), ".2f")
    paired = (record.get("paired_speedup") or {}).get(baseline)
    if cell != "-" and paired and paired["ci95"] and record["variant"] != baseline:
        cell += f" [{paired['ci95'][0]:.2f}, {paired['ci95'][1]:.2f}]"
    return cell


def format_table(document: dict) -> str:
    """The terminal table: per configuration, one row per model and variant with
    throughput, spread, step time, first-call time, peak memory, agreement with the
    eager baseline and one speedup column per baseline variant; then notes."""
    env = document["environment"]
    speedups = _speedup_columns(document)
    headers = ["model", "variant", "img/s", "IQR %", "ms/step", "first call s", "peak MiB", "out err", "ops on"] + \
              [SPEEDUP_HEADER.get(name, f"x {name}") for name in speedups]
    lines = [f"cnnkernels-bench on {env['device_name']} ({env['device']}, {env['threads']} threads), "
             f"torch {env['torch']}, {document['settings']['iterations']} timed steps after "
             f"{document['settings']['warmup']} warm-up"]
    if env.get("device") == "cpu" and env.get("cpu_flags"):
        present = [flag for flag, on in env["cpu_flags"].items() if on]
        lines.append(f"CPU flags: {' '.join(present) or 'none of ' + ', '.join(env['cpu_flags'])}")
    if document["settings"].get("cpu_malloc"):
        lines.append(f"CPU memory: {document['settings']['cpu_malloc']}")
    busy = busy_warning(env)
    if busy:
        lines.append(busy)
    for records in grouped(document).values():
        rows = []
        previous_model = None
        for r in records:
            model = r["model"] if r["model"] != previous_model else ""
            previous_model = r["model"]
            if r["status"] != "ok":
                rows.append([model, r["variant"], f"{'skipped' if r['status'] == 'skipped' else 'FAILED'}: "
                                                  f"{r['error'][:90]}"])
                continue
            memory = r["memory"]
            rows.append([model, r["variant"], _fmt(r["images_per_s"], ".1f"), _fmt(r["iqr_percent"], ".1f"),
                         _fmt(r["median_s"] * 1e3, ".1f"), _fmt(r["first_call_s"], ".2f"),
                         _fmt(memory["peak_bytes"] / MIB, ".0f"), _fmt(r.get("output_rel_err_vs_eager"), ".1e"),
                         backends_text(r)]
                        + [_speedup_cell(r, name) for name in speedups])
        lines.append("")
        lines.append(config_title(records[0]))
        lines.extend(_render(headers, rows))
    lines.append("")
    lines.append("baselines (same weights in every variant, loaded strict):")
    for name, arch in document["architectures"].items():
        lines.append(f"  {name}: {arch['baseline']}" + (f" -- {arch['note']}" if arch["note"] else ""))
    lines.append("img/s: batch / median step time; IQR %: interquartile range of step times / median; "
                 "first call: compilation and one-time work, not in the steady state; out err: "
                 "||logits - eager logits|| / ||eager logits|| on the first batch; ops on: the backends that "
                 "ran the cnnkernels ops (- = none called); x <baseline>: "
                 "img/s over that baseline's img/s; [lo, hi] (cpu): 95% confidence interval of the median of "
                 "the per-round ratios (the baseline's step time over the row's, both timed in the same "
                 "round), so an interval that holds 1.00 shows no difference at this machine's noise.")
    lines.append(f"peak MiB: {document['methodology']['memory']}")
    return "\n".join(lines)


def backends_text(record: dict) -> str:
    """Which backends ran the cnnkernels ops of a record, e.g. "cpu" or "cpu+reference";
    "-" when the variant calls no cnnkernels op (a torchvision baseline)."""
    used = sorted({backend for per_op in record.get("cnnkernels_backends_used", {}).values() for backend in per_op})
    return "+".join(used) if used else "-"


def busy_warning(env: dict) -> str | None:
    """A warning when the 1-minute load average, at the start or the end of the run,
    exceeded the usable cores: other processes competed for them."""
    cores = env.get("usable_cores") or env.get("logical_cores") or 1
    loads = [load[0] for load in (env.get("load_average_at_start"), env.get("load_average_at_end")) if load]
    if loads and max(loads) > cores:
        return (f"WARNING: the machine was busy (1-minute load average up to {max(loads):.1f} on {cores} usable "
                f"cores): other processes competed for the CPU, so timings are slower and noisier than "
                f"on an idle machine (with more threads than free cores, OpenMP waits multiply: --threads 1 "
                f"suffers least).")
    return None


def _render(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned numeric columns; a FAILED row spans the numeric columns."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) == len(headers):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
        else:
            widths[0], widths[1] = max(widths[0], len(row[0])), max(widths[1], len(row[1]))

    def line(cells):
        text = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        if len(cells) == len(headers):
            text += [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:])]
        else:
            text += cells[2:]
        return "  ".join(text).rstrip()
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    return out


def _clean(value):
    """JSON-safe copy: NaN and infinities become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def output_stem(document: dict) -> str:
    """File name stem: cnnkernels-bench-<device type>-<YYYYmmdd-HHMMSS>."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.strptime(document["created"][:19], "%Y-%m-%dT%H:%M:%S"))
    return f"cnnkernels-bench-{document['environment']['device'].split(':')[0]}-{stamp}"


def write_json(document: dict, path: pathlib.Path) -> pathlib.Path:
    """Writes the document (every figure, the environment, the methodology) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(document), indent=1, allow_nan=False) + "\n")
    return path


def _reference_record(records: list[dict]) -> dict | None:
    """The record a model's bars are relative to: its baseline eager run, else its first
    successful baseline run, else None."""
    ok = [r for r in records if r["status"] == "ok"]
    for candidates in ([r for r in ok if r["variant"] == "eager"], [r for r in ok if r["role"] == "baseline"]):
        if candidates:
            return candidates[0]
    return None


def write_png(document: dict, path: pathlib.Path) -> pathlib.Path:
    """A bar chart (matplotlib, Agg backend), one panel per configuration: for each
    model, one bar per variant giving its throughput relative to the model's baseline
    eager run (1.0 = baseline eager; quartile whiskers), labelled with its images/s."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups = list(grouped(document).values())
    variants = list(dict.fromkeys(r["variant"] for r in document["results"]))
    labels = {r["variant"]: r["label"] for r in document["results"]}
    most_models = max(len({r["model"] for r in records}) for records in groups)
    width_inches = max(6.5, 1.5 + most_models * (0.5 + 0.45 * len(variants)))
    fig, axes = plt.subplots(len(groups), 1, figsize=(width_inches, 4.4 * len(groups) + 0.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(len(variants), 1)
    for ax, records in zip(axes[:, 0], groups):
        models = list(dict.fromkeys(r["model"] for r in records))
        tick_labels, legend_done = [], set()
        for m_index, model in enumerate(models):
            per_model = [r for r in records if r["model"] == model]
            reference = _reference_record(per_model)
            tick_labels.append(model if reference is None or reference["variant"] == "eager"
                               else f"{model}\n(vs {reference['variant']})")
            for v_index, variant in enumerate(variants):
                match = [r for r in per_model if r["variant"] == variant]
                if not match:
                    continue
                r = match[0]
                x = m_index + (v_index - (len(variants) - 1) / 2) * width
                if r["status"] != "ok" or reference is None:
                    ax.text(x, 0.02, "failed" if r["status"] != "ok" else "no baseline", rotation=90,
                            ha="center", va="bottom", fontsize=7, color="red")
                    continue
                scale = reference["images_per_s"]
                value = r["images_per_s"] / scale
                low, high = (q / scale for q in r["images_per_s_quartiles"])
                ax.bar(x, value, width, color=colors(v_index % 10),
                       label=labels[variant] if variant not in legend_done else None,
                       yerr=[[max(value - low, 0.0)], [max(high - value, 0.0)]], capsize=2)
                legend_done.add(variant)
                ax.text(x - width * 0.22, 0.02, f"{r['images_per_s']:.3g} img/s", ha="center", va="bottom", fontsize=6.5,
                        rotation=90)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(tick_labels, fontsize=8)
        ax.set_ylabel("throughput / baseline eager")
        ax.set_title(config_title(records[0]), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.margins(y=0.25)
    env = document["environment"]
    fig.suptitle(f"cnnkernels-bench: {env['device_name']}, {env['threads']} threads, torch {env['torch']}\n"
                 f"bars: median throughput relative to baseline eager (whiskers: quartiles); labels: images/s",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(document: dict, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes <folder>/<stem>.json and <folder>/<stem>.png; returns both paths."""
    folder = pathlib.Path(folder)
    stem = output_stem(document)
    return write_json(document, folder / f"{stem}.json"), write_png(document, folder / f"{stem}.png")
