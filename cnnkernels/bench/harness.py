"""Measuring: builds each variant of a model, runs it, and returns every figure.

A variant is one way of running an architecture: the baseline model eager or under
torch.compile (default or max-autotune mode), or our model eager or compiled. All
variants of a model start from the same weights (our state_dict, loaded strict).

Methodology (also written into every JSON file, see METHODOLOGY):
- one step = a forward pass under no_grad (inference), or zero_grad + forward +
  cross-entropy + backward + SGD(momentum 0.9) step (train), under torch.autocast when
  the dtype is not float32;
- the first call is timed on its own (it includes torch.compile's compilation, cuDNN
  autotuning, weight prepacking), then `warmup` untimed steps, then `iterations` timed
  steps; each step reads the next batch of a pool of INPUT_POOL random batches
  (rotating inputs, so no step finds its input hot in cache);
- CPU: time.perf_counter around each step (CPU work is synchronous); CUDA: a pair of
  CUDA events around each step, read after one synchronisation at the end;
- reported: median step time and its spread (quartiles, min, max, std), throughput =
  batch / median step time, and the wall-clock throughput of the whole timed loop as
  a cross-check;
- peak memory: see cnnkernels.bench.memory.MEMORY_METHOD.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnkernels.bench.architectures import Architecture, architecture
from cnnkernels.bench.environment import describe
from cnnkernels.bench import openvino_engine
from cnnkernels.bench.memory import MEMORY_METHOD, profiled_peak_bytes, state_bytes
from cnnkernels.bench.timing import (AUX_WEIGHT, INPUT_POOL, METHODOLOGY, SGD_LR, SGD_MOMENTUM, TIMING_METHOD,
                                     add_comparisons, summarize, timed_rounds, wait_until_idle)
from cnnkernels.bench.variants import VARIANTS, Variant

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("inference", "train")



@dataclass(frozen=True)
class Config:
    """One measured configuration: device ("cpu", "cuda", "cuda:1"), batch size, image
    side (inputs are [batch, 3, image_size, image_size]), dtype name (DTYPES),
    memory format name (MEMORY_FORMATS), mode ("inference" or "train")."""
    device: str
    batch_size: int
    image_size: int
    dtype: str
    memory_format: str
    mode: str
    num_classes: int = 1000

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def label(self) -> str:
        return (f"{self.mode}, {self.dtype}, {self.memory_format}, batch {self.batch_size}, "
                f"{self.image_size}x{self.image_size}, {self.device}")


@dataclass
class Settings:
    """Everything one run measures: models x configs x variants, and how."""
    models: Sequence[str]
    configs: Sequence[Config]
    variants: Sequence[str]
    iterations: int
    warmup: int
    backend: str | None = None  # cnnkernels backend forced for our variants (None: default choice)
    seed: int = 0
    cudnn_benchmark: bool = True
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Forces every cnnkernels op onto backend `name` through CNNKERNELS_BACKEND for the
    block. An environment variable, unlike use_backend()'s context variable, is also
    seen by the autograd engine's worker threads, where CUDA backward ops run."""
    if name is None:
        yield
        return
    from cnnkernels._backends import ENV_VAR

    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


@contextlib.contextmanager
def recording_backends() -> Iterator[dict[str, dict[str, int]]]:
    """Counts, per cnnkernels op, which backend ran each call made inside the block
    ({op: {backend: calls}}), by wrapping the dispatcher's backend selection (which
    every call goes through, eager or compiled)."""
    from cnnkernels import _backends

    counts: dict[str, dict[str, int]] = {}
    select = _backends.select

    def counting_select(op_name, args):
        chosen = select(op_name, args)
        per_op = counts.setdefault(op_name, {})
        per_op[chosen.backend] = per_op.get(chosen.backend, 0) + 1
        return chosen

    _backends.select = counting_select
    try:
        yield counts
    finally:
        _backends.select = select


def synchronize(device: str) -> None:
    """Waits for the device's queued work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def logits_of(output) -> torch.Tensor:
    """The main logits of a model output: the tensor itself, or the first field of a
    tuple / namedtuple (torchvision GoogLeNet / Inception with auxiliary heads)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}")


def training_loss(output, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits; for a tuple output (main logits first, then
    auxiliary classifiers, as GoogLeNet / Inception return in training) the main term
    plus AUX_WEIGHT times each auxiliary term."""
    if isinstance(output, torch.Tensor):
        return F.cross_entropy(output, target)
    main, *aux = output
    loss = F.cross_entropy(main, target)
    for extra in aux:
        if extra is not None:
            loss = loss + AUX_WEIGHT * F.cross_entropy(extra, target)
    return loss


def make_inputs(config: Config, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """INPUT_POOL (images [batch, 3, H, W] float32 in config's memory format, labels
    [batch] int64) pairs, drawn from a seeded generator, on config's device."""
    gen = torch.Generator().manual_seed(seed + 1)
    pool = []
    for _ in range(INPUT_POOL):
        x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=gen)
        y = torch.randint(0, config.num_classes, (config.batch_size,), generator=gen)
        x = x.to(config.device).contiguous(memory_format=MEMORY_FORMATS[config.memory_format])
        pool.append((x, y.to(config.device)))
    return pool


def reference_state(arch: Architecture, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Our model's state_dict, built with torch.manual_seed(seed): the weights every
    variant of the architecture loads."""
    torch.manual_seed(seed)
    model = arch.ours(num_classes)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def build_model(arch: Architecture, variant: Variant, state: dict[str, torch.Tensor],
                num_classes: int) -> nn.Module:
    """A fresh model for the variant (ours or the baseline) holding `state`, strict:
    ValueError naming the missing and unexpected keys when the baseline's differ."""
    model = arch.ours(num_classes) if variant.role == "ours" else arch.build_baseline(state, num_classes)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        who = "our model" if variant.role == "ours" else arch.baseline_label
        raise ValueError(f"{who} does not take {arch.name}'s weights: missing keys {result.missing_keys[:8]}, "
                         f"unexpected keys {result.unexpected_keys[:8]}")
    return model


@dataclass
class Prepared:
    """A variant ready to run: step(x, y) runs one step and returns the logits."""
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    backend: str | None


def prepare(arch: Architecture, variant: Variant, config: Config, state: dict[str, torch.Tensor],
            backend: str | None = None) -> Prepared:
    """Builds the variant's model on config's device, in its memory format and mode,
    compiled if the variant says so, and the step function that runs it."""
    model = build_model(arch, variant, state, config.num_classes)
    model = model.to(config.device, memory_format=MEMORY_FORMATS[config.memory_format])
    training = config.mode == "train"
    model.train(training)
    if variant.freeze:
        from cnnkernels.nn import freeze
        freeze(model, retain_freed_memory=False)  # the run's --cpu-malloc decides, for every variant
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM) if training else None
    runner = model
    if variant.compile_mode is not None:
        runner = torch.compile(model, mode=None if variant.compile_mode == "default" else variant.compile_mode,
                               options=variant.compile_options or None)
    device_type = config.device_type
    if variant.engine == "openvino":
        engine = openvino_engine.runner(model, device_type, DTYPES[config.dtype], training)
        return Prepared(lambda x, y: engine(x), model, None, None)
    dtype = DTYPES[config.dtype]
    use_autocast = dtype != torch.float32
    mark_cudagraph_step = variant.compile_mode is not None and device_type == "cuda"
    forced = backend if variant.role == "ours" else arch.baseline_backend

    def autocast():
        return torch.autocast(device_type, dtype=dtype) if use_autocast else contextlib.nullcontext()

    if training:
        def step(x, y):
            if mark_cudagraph_step:
                torch.compiler.cudagraph_mark_step_begin()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                output = runner(x)
                loss = training_loss(output, y)
                logits = logits_of(output)
            loss.backward()
            optimizer.step()
            return logits.detach()
    else:
        def step(x, y):
            if mark_cudagraph_step:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), autocast():
                return logits_of(runner(x))
    return Prepared(step, model, optimizer, forced)


def first_call(prepared: Prepared, inputs, config: Config, warmup: int, tick: Callable[[str], None]) -> dict:
    """The first call, timed alone, then `warmup` untimed steps: {'first_call_s',
    'first_output', 'cnnkernels_backends_used' (which backend ran each cnnkernels op in
    the first call: {op: {backend: calls}})}."""
    with forced_backend(prepared.backend):
        synchronize(config.device)
        settled_s = wait_until_idle() if torch.device(config.device).type == "cpu" else 0.0
        with recording_backends() as backends_used:
            start = time.perf_counter()
            first_output = prepared.step(*inputs[0])
            synchronize(config.device)
            first_call_s = time.perf_counter() - start
        tick("first call")
        for i in range(warmup):
            prepared.step(*inputs[(i + 1) % len(inputs)])
            tick("warm-up")
        synchronize(config.device)
    return {"first_call_s": first_call_s, "first_call_settled_s": settled_s, "warmup": warmup,
            "cnnkernels_backends_used": backends_used,
            "first_output": first_output.detach().to("cpu", torch.float64, copy=True)}


def cpu_memory(prepared: Prepared, inputs, iterations: int) -> dict:
    """Peak memory of one extra step (cnnkernels.bench.memory) plus the state it holds."""
    with forced_backend(prepared.backend):
        step_peak = profiled_peak_bytes(lambda: prepared.step(*inputs[iterations % len(inputs)]))
    held = state_bytes(prepared.model, prepared.optimizer, inputs)
    return {"peak_bytes": held + step_peak, "state_bytes": held, "step_peak_bytes": step_peak,
            "method": MEMORY_METHOD["cpu"]}


def timing_figures(times: list[float], wall_s: float, config: Config) -> dict:
    figures = {"iterations": len(times), "times_s": times, **summarize(times, config.batch_size)}
    figures["wall_images_per_s"] = config.batch_size * len(times) / wall_s
    return figures


def measure(prepared: Prepared, inputs, config: Config, iterations: int, warmup: int,
            progress: Callable[[str], None] | None = None) -> dict:
    """One variant alone: first call, warm-up and timed steps (see the module docstring);
    returns first_call()'s figures, 'times_s', the timing summary, 'wall_images_per_s'
    and 'memory'. progress(phase) is called once per step."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    device = config.device
    tick = progress or (lambda phase: None)
    figures = first_call(prepared, inputs, config, warmup, tick)
    with forced_backend(prepared.backend):
        cuda = config.device_type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            held_at_start = torch.cuda.memory_allocated(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iterations)]
        times = []
        loop_start = time.perf_counter()
        for i in range(iterations):
            x, y = inputs[i % len(inputs)]
            if cuda:
                events[i][0].record()
                prepared.step(x, y)
                events[i][1].record()
            else:
                t0 = time.perf_counter()
                prepared.step(x, y)
                times.append(time.perf_counter() - t0)
            tick("timed")
        synchronize(device)
        wall_s = time.perf_counter() - loop_start
    if cuda:
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_bytes": peak, "state_bytes": held_at_start, "step_peak_bytes": peak - held_at_start,
                  "method": MEMORY_METHOD["cuda"]}
    else:
        memory = cpu_memory(prepared, inputs, iterations)
        tick("memory")
    return {**figures, **timing_figures(times, wall_s, config), "memory": memory}


def _record(arch: Architecture, variant: Variant, config: Config, settings: Settings) -> dict:
    return {"model": arch.name, "baseline": arch.baseline_label, "variant": variant.name,
            "label": variant.label, "role": variant.role, "compile_mode": variant.compile_mode,
            "forced_backend": settings.backend if variant.role == "ours" else arch.baseline_backend,
            **{k: v for k, v in asdict(config).items()}}


def _failed(record: dict, error: Exception) -> dict:
    """Records a failure (status "error", message, traceback) or a skip with its reason."""
    skipped = isinstance(error, openvino_engine.Unavailable)
    record["status"] = "skipped" if skipped else "error"
    record["error"] = str(error) if skipped else f"{type(error).__name__}: {error}".splitlines()[0][:500]
    if not skipped:
        record["traceback"] = traceback.format_exception(error)
    return record


def _release(config: Config) -> None:
    torch._dynamo.reset()
    gc.collect()
    if config.device_type == "cuda":
        torch.cuda.empty_cache()


def run_variant(arch: Architecture, variant: Variant, config: Config, state, inputs, settings: Settings,
                progress: Callable[[str], None] | None = None) -> dict:
    """Measures one variant alone; a failure is recorded (status "error", the message
    and the traceback) and a variant that cannot run here is "skipped" with its reason,
    not raised, so one broken variant does not stop the run."""
    record = _record(arch, variant, config, settings)
    _release(config)
    try:
        prepared = prepare(arch, variant, config, state, settings.backend)
        record.update(measure(prepared, inputs, config, settings.iterations, settings.warmup, progress))
        record["status"] = "ok"
    except Exception as error:  # recorded in the results; the run goes on with the next variant
        _failed(record, error)
    finally:
        prepared = None
        _release(config)
    return record


def run_interleaved(arch: Architecture, variants: Sequence[Variant], config: Config, state, inputs,
                    settings: Settings, tick: Callable[[str, str], None]) -> list[dict]:
    """Measures the variants of one model and configuration together (cpu): each is built
    and takes its first call and warm-up in turn, then their timed steps run in rounds
    (one step of each variant per round), then each one's memory. Failures and skips are
    recorded per variant, as in run_variant."""
    if settings.iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {settings.iterations}")
    records = {v.name: _record(arch, v, config, settings) for v in variants}
    live: dict[str, Prepared] = {}
    _release(config)
    try:
        for v in variants:
            try:
                prepared = prepare(arch, v, config, state, settings.backend)
                records[v.name].update(first_call(prepared, inputs, config, settings.warmup,
                                                  lambda phase, name=v.name: tick(name, phase)))
                live[v.name] = prepared
            except Exception as error:  # recorded; the other variants go on
                _failed(records[v.name], error)

        def stepper(prepared: Prepared):
            def step(i: int) -> None:
                with forced_backend(prepared.backend):
                    prepared.step(*inputs[i % len(inputs)])
            return step
        times, errors = timed_rounds({name: stepper(p) for name, p in live.items()}, settings.iterations, tick)
        for name, prepared in live.items():
            record = records[name]
            if name in errors:
                _failed(record, RuntimeError(errors[name]))
                continue
            record.update(timing_figures(times[name], sum(times[name]), config))
            record["memory"] = cpu_memory(prepared, inputs, settings.iterations)
            record["status"] = "ok"
            tick(name, "memory")
    finally:
        live.clear()
        _release(config)
    return list(records.values())


def _tell_failure(bar, desc: str, record: dict) -> None:
    if record["status"] != "ok":
        bar.write(f"{desc}: {'skipped' if record['status'] == 'skipped' else 'FAILED'}: {record['error']}")


def run(settings: Settings, progress: bool = True) -> dict:
    """Measures every model x config x variant of settings and returns the document
    written to JSON: {'schema', 'created', 'environment', 'settings', 'methodology',
    'architectures', 'results'}."""
    from tqdm import tqdm

    device = settings.configs[0].device
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    archs = [architecture(name) for name in settings.models]
    variants = [VARIANTS[name] for name in settings.variants]
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    records = []
    total = len(archs) * len(settings.configs) * len(variants)
    per_variant_steps = 1 + settings.warmup + settings.iterations + (1 if torch.device(device).type == "cpu" else 0)
    with tqdm(total=total, desc="benchmark", unit="run", disable=not progress, position=0,
              dynamic_ncols=True) as outer:
        for arch in archs:
            outer.set_postfix_str(f"{arch.name}: building weights")
            state = reference_state(arch, settings.configs[0].num_classes, settings.seed)
            for config in settings.configs:
                inputs = make_inputs(config, settings.seed)
                if config.device_type == "cpu":
                    group = f"{arch.name} {config.mode}"
                    outer.set_postfix_str(f"{group}: {', '.join(v.name for v in variants)} in rounds")
                    with tqdm(total=len(variants) * per_variant_steps, desc=group, unit="step", leave=False,
                              position=1, disable=not progress, dynamic_ncols=True) as inner:
                        def tick_variant(name, phase, inner=inner):
                            inner.update(1)
                            inner.set_postfix_str(f"{name}: {phase}")
                        group_records = run_interleaved(arch, variants, config, state, inputs, settings, tick_variant)
                    for record in group_records:
                        _tell_failure(outer, f"{group} {record['variant']}", record)
                    records.extend(group_records)
                    outer.update(len(variants))
                    del inputs
                    continue
                for variant in variants:
                    desc = f"{arch.name} {config.mode} {variant.name}"
                    outer.set_postfix_str(desc)
                    with tqdm(total=per_variant_steps, desc=desc, unit="step", leave=False, position=1,
                              disable=not progress, dynamic_ncols=True) as inner:
                        inner.set_postfix_str("first call" + (" (compiling)" if variant.compile_mode else ""))

                        def tick(phase, inner=inner):
                            inner.update(1)
                            inner.set_postfix_str(phase)
                        record = run_variant(arch, variant, config, state, inputs, settings, tick)
                    _tell_failure(outer, desc, record)
                    records.append(record)
                    outer.update(1)
                del inputs
            del state
            gc.collect()
    add_comparisons(records)
    return {
        "schema": "cnnkernels-bench/1",
        "created": created,
        "environment": {**describe(device), "load_average_at_start": load_at_start},
        "settings": {"models": list(settings.models), "variants": list(settings.variants),
                     "configs": [asdict(c) for c in settings.configs], "iterations": settings.iterations,
                     "warmup": settings.warmup, "input_pool": INPUT_POOL, "seed": settings.seed,
                     "cnnkernels_backend": settings.backend or "default choice per op",
                     "cudnn_benchmark": settings.cudnn_benchmark if torch.device(device).type == "cuda" else None,
                     **settings.extra},
        "methodology": {**METHODOLOGY, "timing": TIMING_METHOD[torch.device(device).type],
                        "memory": MEMORY_METHOD[torch.device(device).type]},
        "architectures": {a.name: {"baseline": a.baseline_label, "baseline_backend": a.baseline_backend,
                                   "note": a.note} for a in archs},
        "results": records,
    }
