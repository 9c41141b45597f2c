"""How cnnkernels-bench times and summarises steps (written into every JSON file), and the
interleaved rounds of the CPU measurements."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

import torch

AUX_WEIGHT = 0.3  # weight of auxiliary classifiers' losses in train mode (GoogLeNet's)
SGD_LR, SGD_MOMENTUM = 0.01, 0.9
INPUT_POOL = 4

TIMING_METHOD = {
    "cpu": "time.perf_counter() around each step (CPU execution is synchronous), the variants' steps "
           "interleaved in rounds",
    "cuda": "a pair of CUDA events recorded around each step on the current stream, read after a single "
            "torch.cuda.synchronize() at the end of the timed loop",
}
METHODOLOGY = {
    "step": {"inference": "forward pass under torch.no_grad()",
             "train": f"zero_grad(set_to_none=True) + forward + cross_entropy (plus {AUX_WEIGHT} x each auxiliary "
                      f"classifier's, for models that return them in training) + backward + "
                      f"SGD(lr={SGD_LR}, momentum={SGD_MOMENTUM}) step"},
    "dtype": "float32 runs plainly; bfloat16 / float16 run under torch.autocast(device, dtype) with "
             "float32 weights (mixed precision)",
    "order": "first call (timed alone: includes compilation and other one-time work; on cpu only once the "
             "process is idle, at most 5 s after the previous variant, whose engine may keep threads busy), "
             "then the warm-up "
             "steps (untimed), then the timed steps; on cpu the variants of one model and configuration "
             "take their timed steps in rounds (eager, compile, ours, eager, ...), so that a burst of load "
             "from elsewhere hits every variant alike",
    "inputs": f"a pool of {INPUT_POOL} random batches (and labels), used in turn (rotating inputs)",
    "throughput": "images_per_s = batch_size / median step time; images_per_s_quartiles from the step "
                  "time quartiles; wall_images_per_s = batch_size * iterations / the sum of the variant's "
                  "timed steps (cpu, interleaved) or the wall time of its timed loop (cuda)",
    "speedup": "images_per_s of the row / images_per_s of the baseline variant, same model and configuration",
    "paired_speedup": "cpu (interleaved rounds) only: per round, the baseline's step time / the row's step time "
                      "in the same round; their median, a 95% confidence interval of that median (order "
                      "statistics: distribution-free, exact binomial coverage; null under 6 rounds), the "
                      "number of rounds and how many of them the row was faster in",
    "output_rel_err_vs_eager": "||out - out_eager|| / ||out_eager|| of the first call's logits, same "
                               "weights and input, float64 (agreement check, not a speed figure)",
    "weights": "every variant of a model loads the same state_dict (ours, seeded), strict=True",
    "cnnkernels_backends_used": "per cnnkernels op, how many of its calls in the first step ran on each "
                                "backend (counted at the backend dispatcher)",
}


def summarize(times: Sequence[float], batch_size: int) -> dict:
    """Median, quartiles, min, max, mean, std of step times (s) and the throughputs."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    q1, q3 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
    return {
        "median_s": median, "q1_s": q1, "q3_s": q3, "min_s": ordered[0], "max_s": ordered[-1],
        "mean_s": statistics.fmean(ordered), "std_s": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "iqr_percent": 100.0 * (q3 - q1) / median if median > 0 else math.nan,
        "images_per_s": batch_size / median,
        "images_per_s_quartiles": [batch_size / q3, batch_size / q1],
    }


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default)."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed_rounds(steps: dict[str, Callable[[int], None]], iterations: int,
                 tick: Callable[[str, str], None] | None = None) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Times `iterations` rounds; in each, every step function (name -> step(i)) runs once,
    in the given order, under time.perf_counter. A step that raises is dropped from the
    later rounds. Returns ({name: step times}, {name: error of a dropped step})."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    errors: dict[str, str] = {}
    for i in range(iterations):
        for name, step in steps.items():
            if name in errors:
                continue
            start = time.perf_counter()
            try:
                step(i)
            except Exception as error:  # recorded for that variant; the others go on
                errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
                continue
            times[name].append(time.perf_counter() - start)
            if tick is not None:
                tick(name, "timed")
    return times, errors


def wait_until_idle(max_s: float = 5.0, window_s: float = 0.05, busy_fraction: float = 0.1) -> float:
    """Sleeps until this process uses under busy_fraction of one core over a window_s
    window (its own threads idle: e.g. OpenVINO's compile threads, still busy for seconds
    after compile_model returns, or torch.compile's workers), at most max_s; returns the
    seconds waited. A first call timed right after OpenVINO's read 0.54 s instead of 0.21."""
    start = time.perf_counter()
    while True:
        cpu = time.process_time()
        time.sleep(window_s)
        waited = time.perf_counter() - start
        if time.process_time() - cpu < busy_fraction * window_s or waited >= max_s:
            return waited


def median_interval(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based indices (lo, hi) into n sorted values bounding a distribution-free confidence
    interval of their population median: [x_(k), x_(n-k+1)] for the largest k whose
    coverage 1 - 2 P(Binomial(n, 1/2) <= k - 1) is at least `confidence`; None when even
    [min, max] falls short (n < 6 at 95 %)."""
    alpha = 1.0 - confidence
    tail, best = 0.0, None
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2.0 ** n  # P(B <= k - 1)
        if 2.0 * tail > alpha:
            break
        best = k
    return None if best is None else (best - 1, n - best)


def paired_speedup(baseline_times: Sequence[float], times: Sequence[float]) -> dict | None:
    """The row's speedup over a baseline from steps timed in the same rounds: per round
    baseline / row step time, their median, its 95% interval (median_interval), the rounds
    and the rounds the row won. None unless both have the same number of rounds."""
    if not times or len(times) != len(baseline_times):
        return None
    ratios = sorted(b / t for b, t in zip(baseline_times, times))
    bounds = median_interval(len(ratios))
    return {"median": statistics.median(ratios),
            "ci95": None if bounds is None else [ratios[bounds[0]], ratios[bounds[1]]],
            "rounds": len(ratios), "wins": sum(r > 1.0 for r in ratios)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def add_comparisons(records: list[dict]) -> None:
    """Adds 'speedup' {baseline variant: ratio of images_per_s}, on cpu (interleaved rounds)
    'paired_speedup' {baseline variant: paired_speedup(...)}, and 'output_rel_err_vs_eager'
    to every ok record, within each (model, config)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["model"], record["device"], record["batch_size"], record["image_size"], record["dtype"],
               record["memory_format"], record["mode"])
        groups.setdefault(key, []).append(record)
    for group in groups.values():
        baselines = {r["variant"]: r for r in group if r["role"] == "baseline" and r["status"] == "ok"}
        for record in group:
            if record["status"] != "ok":
                continue
            record["speedup"] = {name: record["images_per_s"] / base["images_per_s"]
                                 for name, base in baselines.items()}
            if record["device"] == "cpu":
                record["paired_speedup"] = {name: paired_speedup(base["times_s"], record["times_s"])
                                            for name, base in baselines.items()}
            eager = baselines.get("eager")
            record["output_rel_err_vs_eager"] = (rel_err(record["first_output"], eager["first_output"])
                                                 if eager is not None else None)
    for record in records:
        record.pop("first_output", None)
