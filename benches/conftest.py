"""Settings and reporting of the benchmark suites in benches/.

bench_ops.py options (all optional):
  --bench-ops-batch N       batch size (default 2 on CPU, where the whole file then runs
                            in a few minutes on 2 cores; 32 on GPU)
  --bench-ops-dtype D       float32 (default), bfloat16 or float16
  --bench-ops-threads T     torch.set_num_threads(T) for the session (default: torch's own
                            choice, one per core). On a machine other processes keep busy,
                            1 thread avoids the stalls of a parallel region whose second
                            thread is descheduled (times then jump in 4 ms ticks)
  --bench-ops-compile M     which modes get the torch.compile baseline: all, eval or none
                            (default: eval on CPU, all on GPU). On 2 CPU cores with a
                            cold inductor cache, compiling takes about 1 to 5 s per layer
                            in eval (with freezing: CPU eval's bar) but 7 to 15 s in
                            train, which would double the file's run time (once cached:
                            under 1 s each); --bench-ops-compile=all adds them.
pytest-benchmark settings: warm-up is on and limited to 5 iterations
(--benchmark-warmup=on --benchmark-warmup-iterations=5) unless given on the command
line; rounds, max time and the median are pytest-benchmark's own settings
(--benchmark-min-rounds, --benchmark-max-time ...).

At the end of the session a table lists, per group of bench_ops.py, the median of each
variant, our speed-up and the memory traffic the fusion saves (extra_info, counted by
cnnkernels/bench/traffic.py).

    pytest benches/bench_ops.py --benchmark-only
    pytest benches/bench_ops.py --benchmark-only --bench-ops-compile=all -k "conv_bn_act and train"
    pytest benches/bench_ops.py --benchmark-only --bench-ops-threads=1   # on a busy machine
"""
import os
import pathlib
import platform
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run against the source tree without an install
    sys.path.insert(0, str(ROOT))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = {"all": ("eval", "train"), "eval": ("eval",), "none": ()}
WARMUP_ITERATIONS = 5


def pytest_addoption(parser):
    group = parser.getgroup("cnnkernels bench_ops")
    group.addoption("--bench-ops-batch", type=int, default=2 if DEVICE == "cpu" else 32,
                    help="batch size of bench_ops.py (default: %(default)s)")
    group.addoption("--bench-ops-dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype of bench_ops.py (default: %(default)s)")
    group.addoption("--bench-ops-threads", type=int, default=None,
                    help="torch threads for bench_ops.py (default: torch's own choice)")
    group.addoption("--bench-ops-compile", choices=sorted(COMPILE_MODES), default="eval" if DEVICE == "cpu" else "all",
                    help="modes that get the torch.compile baseline (default: %(default)s)")


def _given(config, option: str) -> bool:
    args = list(config.invocation_params.args) + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(arg == option or arg.startswith(option + "=") for arg in args)


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options (its configure is trylast)
def pytest_configure(config):
    batch, threads = config.getoption("--bench-ops-batch"), config.getoption("--bench-ops-threads")
    if batch < 2:
        raise pytest.UsageError(f"--bench-ops-batch must be at least 2 (training needs batch statistics), got {batch}")
    if threads is not None and threads < 1:
        raise pytest.UsageError(f"--bench-ops-threads must be at least 1, got {threads}")
    if not hasattr(config.option, "benchmark_warmup"):
        return
    if not _given(config, "--benchmark-warmup"):
        config.option.benchmark_warmup = True
    if not _given(config, "--benchmark-warmup-iterations"):
        config.option.benchmark_warmup_iterations = WARMUP_ITERATIONS


@pytest.fixture(autouse=True, scope="module")
def _cudnn_benchmark():
    """cudnn.benchmark on for the GPU suites (eager's strongest setting), restored after each module."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = DEVICE == "cuda"
    yield
    torch.backends.cudnn.benchmark = previous


@pytest.fixture(scope="session")
def bench_ops_settings(request):
    """bench_ops.py's batch, dtype and compiled modes, from the options above."""
    config = request.config
    compile_ = config.getoption("--bench-ops-compile")
    threads = config.getoption("--bench-ops-threads")
    if threads is not None:
        torch.set_num_threads(threads)
    return SimpleNamespace(batch=config.getoption("--bench-ops-batch"),
                           dtype=DTYPES[config.getoption("--bench-ops-dtype")],
                           compile=compile_, compile_modes=COMPILE_MODES[compile_])


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else platform.processor() or "cpu")


def _ms(seconds):
    return f"{seconds * 1e3:.2f}" if seconds is not None else "-"


def _ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}x" if numerator is not None and denominator else "-"


def traffic_rows(benchmarks) -> tuple[list[str], list[list[str]]]:
    """The summary table of bench_ops.py's benchmarks (those with traffic figures):
    one row per group, medians of every variant, our speed-ups, bytes moved."""
    groups: dict[str, dict] = {}
    for bench in benchmarks:
        info = bench.extra_info
        if "traffic_unfused_bytes" not in info or not bench:
            continue
        row = groups.setdefault(bench.group, {"info": info, "median": {}})
        row["median"][info["variant"]] = bench.stats.median
        if info["variant"] == "torch_compile":
            row["compile_s"] = info["first_call_s"]
    variants = sorted({v for row in groups.values() for v in row["median"]},
                      key=lambda v: (not v.startswith("torch_eager"), not v.startswith("torch_compile"), v))
    ours = [v for v in variants if v.startswith("cnnkernels_")]
    header = (["op", "layer", "mode"] + [f"{v} ms" for v in variants]
              + [f"{v.removeprefix('cnnkernels_')} vs eager" for v in ours]
              + [f"{v.removeprefix('cnnkernels_')} vs compile" for v in ours]
              + ["compile s", "unfused MB", "fused MB", "saved"])
    rows = []
    for row in groups.values():
        info, median = row["info"], row["median"]
        rows.append([info["op"], info["source"], info["mode"]]
                    + [_ms(median.get(v)) for v in variants]
                    + [_ratio(median.get("torch_eager"), median.get(v)) for v in ours]
                    + [_ratio(median.get("torch_compile"), median.get(v)) for v in ours]
                    + [f"{row['compile_s']:.1f}" if "compile_s" in row else "-",
                       f"{info['traffic_unfused_bytes'] / 1e6:.1f}", f"{info['traffic_fused_bytes'] / 1e6:.1f}",
                       f"{info['traffic_saved_pct']:.0f}%"])
    return header, rows


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    header, rows = traffic_rows(session.benchmarks)
    if not rows:
        return
    info = next(b.extra_info for b in session.benchmarks if "traffic_unfused_bytes" in b.extra_info)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    write = terminalreporter.write_line
    terminalreporter.section("bench_ops: medians and memory traffic (bytes read + written, "
                             "cnnkernels/bench/traffic.py)")
    loads = [b.extra_info["loadavg_1m_after"] for b in session.benchmarks if "loadavg_1m_after" in b.extra_info]
    write(f"batch {info['batch']}, {info['dtype']}, {info['memory_format']}, {info['device']}, "
          f"threads {info['threads']}"
          + (f", 1-minute load average {min(loads):.1f} to {max(loads):.1f}; " if loads else "; ") +
          "'vs eager' / 'vs compile': baseline median / ours (above 1: ours faster); "
          "'compile s': torch.compile's first call; MB: 1e6 bytes")
    for r in [header] + rows:
        write("  ".join(str(cell).ljust(width) for cell, width in zip(r, widths)).rstrip())
