"""Whole models: cnnkernels against the same architecture from torchvision (eager and
torch.compile), as pytest-benchmark groups -- the comparison `cnnkernels-bench` makes,
in pytest-benchmark's form, so that its saving and --benchmark-compare work:

    pytest benches/bench_models.py --benchmark-only --benchmark-group-by=group
    pytest benches/bench_models.py --benchmark-only --benchmark-autosave
    pytest benches/bench_models.py --benchmark-only --benchmark-compare

One group per model and configuration holds every variant (baseline eager, baseline
compiled, ours), all loading the same weights. The models, variants, device, batch and
step are cnnkernels-bench's defaults (see `cnnkernels-bench --help`), and are built
and run by the same harness (cnnkernels.bench.harness). Environment overrides:
BENCH_MODELS (comma list), BENCH_BATCH, BENCH_IMAGE_SIZE, BENCH_MODES (inference,train),
BENCH_DTYPE, BENCH_MEMORY_FORMAT, BENCH_VARIANTS, BENCH_ROUNDS (timed rounds; default
cnnkernels-bench's --iterations), BENCH_WARMUP. Each benchmark's extra_info holds the
first-call time (compilation included) and peak memory, measured as cnnkernels-bench
measures them. A model cnnkernels.models does not have is skipped, saying so.
"""
import itertools
import os

import pytest
import torch

from cnnkernels.bench import architectures, cli, harness, memory

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_DEFAULTS = cli.DEFAULTS[DEVICE]


def _env_list(name: str, default) -> list[str]:
    value = os.environ.get(name)
    return [item.strip() for item in value.split(",") if item.strip()] if value else list(default)


MODELS = _env_list("BENCH_MODELS", cli.DEFAULT_MODELS)
MODES = _env_list("BENCH_MODES", _DEFAULTS["mode"])
VARIANTS = _env_list("BENCH_VARIANTS", _DEFAULTS["variants"])
DTYPE = os.environ.get("BENCH_DTYPE", _DEFAULTS["dtype"][0])
MEMORY_FORMAT = os.environ.get("BENCH_MEMORY_FORMAT", _DEFAULTS["memory_format"][0])
BATCH = int(os.environ.get("BENCH_BATCH", _DEFAULTS["batch_size"]))
IMAGE_SIZE = int(os.environ.get("BENCH_IMAGE_SIZE", "224"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", _DEFAULTS["iterations"]))
WARMUP = int(os.environ.get("BENCH_WARMUP", _DEFAULTS["warmup"]))

_weights: dict = {}


def weights(arch) -> dict:
    """Our seeded state_dict of the architecture; only the latest model's is kept."""
    if arch.name not in _weights:
        _weights.clear()
        _weights[arch.name] = harness.reference_state(arch, 1000, seed=0)
    return _weights[arch.name]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_model(benchmark, model, mode, variant):
    try:
        arch = architectures.architecture(model)
    except (ValueError, ModuleNotFoundError) as error:
        pytest.skip(str(error))
    config = harness.Config(DEVICE, BATCH, IMAGE_SIZE, DTYPE, MEMORY_FORMAT, mode)
    benchmark.group = f"{model} {config.label()}"
    benchmark.extra_info.update({"baseline": arch.baseline_label, "variant": harness.VARIANTS[variant].label})
    torch._dynamo.reset()
    inputs = harness.make_inputs(config, seed=0)
    prepared = harness.prepare(arch, harness.VARIANTS[variant], config, weights(arch))
    batches = itertools.cycle(inputs)

    def step():
        prepared.step(*next(batches))
        harness.synchronize(DEVICE)

    try:
        with harness.forced_backend(prepared.backend):
            first = harness.measure(prepared, inputs, config, iterations=1, warmup=WARMUP)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
            if DEVICE == "cuda":
                benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()
            else:
                benchmark.extra_info["peak_bytes"] = first["memory"]["peak_bytes"]
        benchmark.extra_info["first_call_s"] = first["first_call_s"]
        benchmark.extra_info["memory_method"] = memory.MEMORY_METHOD[DEVICE]
        benchmark.extra_info["images_per_step"] = BATCH
    finally:
        del prepared
        torch._dynamo.reset()
