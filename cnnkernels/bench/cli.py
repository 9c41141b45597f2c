"""`cnnkernels-bench`: per-architecture throughput and peak memory of the cnnkernels
models against torchvision eager and torch.compile of the same model, in one run.
`cnnkernels-bench --help` documents every flag, the defaults and the methodology."""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile

DEFAULT_MODELS = ("resnet50", "resnext50", "se_resnext50", "densenet121", "vgg16", "googlenet")
# Per device type: what runs when a flag is not given.
DEFAULTS = {
    "cpu": {"batch_size": 8, "dtype": ["float32"], "memory_format": ["contiguous"], "mode": ["inference"],
            "variants": ["eager", "compile", "cnnkernels", "cnnkernels-frozen"], "iterations": 20, "warmup": 2},
    "cuda": {"batch_size": 256, "dtype": ["bfloat16"], "memory_format": ["channels_last"],
             "mode": ["inference", "train"],
             "variants": ["eager", "compile", "compile-max-autotune", "cnnkernels", "cnnkernels-compile"],
             "iterations": 50, "warmup": 10},
}

DESCRIPTION = """\
Measures, per architecture, throughput (images/s) and peak memory of the cnnkernels
model against its baseline -- the torchvision model of the same architecture with the
same weights -- run eager and under torch.compile, all in one run. Prints a table
with speedup columns against each baseline, and writes a JSON file with every figure
and the environment, and a PNG bar chart, into --output.

Defaults depend on the device (--device; default: cuda when available, else cpu):
  both: models {models}.
  cpu : batch 8, 224x224, float32, contiguous, inference; variants eager, compile,
        cnnkernels, cnnkernels-frozen; 2 warm-up + 20 timed steps.
        On an idle 2-core machine the default run without cnnkernels-frozen took about
        12-13 minutes with cold compile caches (7 of steps, vgg16 a third of them; 5 of
        torch.compile compilations, 15-115 s per model) and about 8 with inductor's
        on-disk cache warm; cnnkernels-frozen adds about as much step time as
        cnnkernels. A busy machine is slower: the table warns when the load was high.
  cuda: batch 256, bfloat16 autocast, channels_last, inference and
        train; variants eager, compile, compile-max-autotune, cnnkernels,
        cnnkernels-compile; cudnn.benchmark on; 10 warm-up + 50 timed steps.

Variants: eager / compile / compile-max-autotune run the baseline model (eager,
torch.compile default mode, mode="max-autotune"); cnnkernels / cnnkernels-compile run
ours; cnnkernels-frozen runs ours after cnnkernels.nn.freeze(model) (BatchNorm folded
into the convolution weights once instead of per call, and in channels_last float32 /
bfloat16 the weights prepacked for oneDNN once per input shape: CPU inference; the
same contract as torch.compile's freezing: parameters do not change behind autograd's
back). compile-freezing is torch.compile with Inductor's freezing (weights constant-folded
and prepacked at compile time; inference); openvino converts the baseline model with
openvino.convert_model and runs it on OpenVINO's CPU plugin with the run's precision
hint and threads (inference on cpu; "skipped" with the reason where openvino is not
installed). se_resnext50 (and other SE nets) have no torchvision twin: their baseline is
torchvision's ResNet with a plain-torch SE gate in each bottleneck (timm's keys; our
weights load strict), as the output says.

Methodology: the first call is timed alone (compilation, cuDNN autotuning and other
one-time work); then warm-up steps; then --iterations timed steps, each on the next
of 4 random input batches (rotating inputs); on cpu the variants of a model take their
timed steps in rounds (eager, compile, ours, eager, ...), so that load from elsewhere
hits every variant alike, and each variant's memory is measured after the rounds.
CPU steps timed with perf_counter, CUDA steps with CUDA events; reported: median step time, quartiles, min/max/std,
images/s = batch / median, and the wall-clock throughput of the loop.
A step is a forward pass under no_grad (inference) or zero_grad + forward +
cross-entropy + backward + SGD step (train); bfloat16/float16 mean torch.autocast with
float32 weights.

CPU memory reuse: on cpu, --cpu-malloc retain (the default) keeps freed memory in the
process for reuse from the start of the run (cnnkernels.nn.cpu_memory, what
cnnkernels.nn.freeze does for CPU models), so that no variant page-faults in fresh pages
for its activations on every step (OpenVINO plans its own pool and takes none either way);
--cpu-malloc unchanged leaves malloc as it is configured for every variant. The setting is
process-wide, so all torch variants of a run get the same one; the header says which.

Peak memory: on CUDA, torch.cuda.max_memory_allocated() over the timed loop after
reset_peak_memory_stats() (every live tensor: weights, gradients, optimizer state,
inputs, activations, workspaces). On CPU, which has no allocator statistics: the bytes
of parameters, buffers, optimizer state and inputs plus the peak of the bytes that one
extra step allocates through torch's CPU allocator and holds at once, from
torch.profiler's memory events (profile_memory=True). Allocator caches and process RSS
overheads are not counted.

Exit status: 0 when every variant ran or was skipped with a reason, 1 when some failed (the table and JSON say
which and why), 2 for bad arguments.
""".format(models=", ".join(DEFAULT_MODELS))


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults that depend on the device are None here and filled
    in by resolve())."""
    parser = argparse.ArgumentParser(prog="cnnkernels-bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv, default=list(DEFAULT_MODELS),
                        help="comma-separated cnnkernels.models names (default: %(default)s); "
                             "--list-models shows the known ones")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 8 on cpu, 256 on cuda)")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default: 224)")
    parser.add_argument("--dtype", type=_csv,
                        help="comma-separated: float32, bfloat16, float16 (or fp32, bf16, fp16); non-float32 "
                             "runs under torch.autocast (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--memory-format", type=_csv,
                        help="comma-separated: contiguous, channels_last (default: contiguous on cpu, "
                             "channels_last on cuda)")
    parser.add_argument("--mode", type=_csv,
                        help="comma-separated: inference, train (default: inference on cpu, both on cuda)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's, all cores)")
    parser.add_argument("--iterations", type=int, help="timed steps per variant (default: 20 on cpu, 50 on cuda)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first call (default: 2 on cpu, 10 on cuda)")
    parser.add_argument("--variants", type=_csv,
                        help="comma-separated: eager, compile, compile-max-autotune, cnnkernels, "
                             "cnnkernels-compile (defaults above)")
    parser.add_argument("--backend", help="force our variants onto one cnnkernels backend "
                                          "(reference, cpu, triton, cuda; default: each op's own choice)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off on cuda")
    parser.add_argument("--cold-compile", action="store_true",
                        help="compile into fresh, empty inductor / triton caches, so that first-call times "
                             "are cold compilations")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("bench-results"),
                        help="folder for the JSON and PNG files (default: %(default)s)")
    parser.add_argument("--cpu-malloc", choices=("retain", "unchanged"), default="retain",
                        help="on cpu: keep freed memory for reuse in every variant (retain, the default) or leave "
                             "malloc as it is configured (unchanged)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list-models", action="store_true", help="list the known models and their baselines, exit")
    return parser


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Validates the arguments and fills in the device defaults; returns
    harness.Settings. Bad values end in parser.error (exit status 2)."""
    import torch

    from cnnkernels._backends import BACKENDS
    from cnnkernels.bench import harness
    from cnnkernels.bench.architectures import architecture

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError as error:
        parser.error(f"--device {device!r}: {error}")
    if device_type not in DEFAULTS:
        parser.error(f"--device {device!r}: choose cpu, cuda or cuda:N")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device!r}: CUDA is not available on this machine (torch {torch.__version__})")
    defaults = DEFAULTS[device_type]

    dtypes = [harness.DTYPE_ALIASES.get(d, d) for d in (args.dtype or defaults["dtype"])]
    _check_choices(parser, "--dtype", dtypes, list(harness.DTYPES))
    formats = args.memory_format or defaults["memory_format"]
    _check_choices(parser, "--memory-format", formats, list(harness.MEMORY_FORMATS))
    modes = args.mode or defaults["mode"]
    _check_choices(parser, "--mode", modes, list(harness.MODES))
    variants = args.variants or defaults["variants"]
    _check_choices(parser, "--variants", variants, list(harness.VARIANTS))
    if args.backend is not None and args.backend not in BACKENDS:
        parser.error(f"--backend {args.backend!r}: choose one of {', '.join(BACKENDS)}")
    if not args.models:
        parser.error("--models: give at least one model")
    for name in args.models:
        try:
            architecture(name)
        except ValueError as error:
            parser.error(f"--models: {error}")
    batch = args.batch_size if args.batch_size is not None else defaults["batch_size"]
    iterations = args.iterations if args.iterations is not None else defaults["iterations"]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    for flag, value, minimum in (("--batch-size", batch, 1), ("--iterations", iterations, 1),
                                 ("--warmup", warmup, 0), ("--image-size", args.image_size, 8),
                                 ("--num-classes", args.num_classes, 1)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if "train" in modes and batch < 2:
        parser.error("--mode train needs --batch-size >= 2 (BatchNorm needs more than one value per channel)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    configs = [harness.Config(device, batch, args.image_size, dtype, fmt, mode, args.num_classes)
               for mode in modes for dtype in dtypes for fmt in formats]
    extra = {}
    if args.cold_compile:
        cache = tempfile.mkdtemp(prefix="cnnkernels-bench-cache-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        extra["compile_cache"] = f"cold: fresh caches in {cache}"
    else:
        extra["compile_cache"] = "inductor's on-disk caches as configured (a warm cache shortens first calls)"
    if device_type == "cpu":
        extra["cpu_malloc"] = _cpu_malloc(args.cpu_malloc)
    return harness.Settings(models=args.models, configs=configs, variants=variants, iterations=iterations,
                            warmup=warmup, backend=args.backend, seed=args.seed,
                            cudnn_benchmark=not args.no_cudnn_benchmark, extra=extra)


def _cpu_malloc(choice: str) -> str:
    """Applies --cpu-malloc for the whole run; returns the line the header prints."""
    from cnnkernels.nn import cpu_memory

    if choice == "unchanged":
        return "malloc as configured (no reuse setting made)"
    if cpu_memory.retain_freed_cpu_memory():
        return "freed memory retained for reuse, every variant (cnnkernels.nn.cpu_memory)"
    return "malloc as configured (not glibc's, or the user's allocator settings stand)"


def _check_choices(parser, flag: str, values: list[str], choices: list[str]) -> None:
    if not values:
        parser.error(f"{flag}: give at least one of {', '.join(choices)}")
    for value in values:
        if value not in choices:
            parser.error(f"{flag} {value!r}: choose from {', '.join(choices)}")


def list_models_text() -> str:
    """The known models, one per line with its baseline."""
    from cnnkernels.bench.architectures import architecture, known_models

    names = known_models()
    if not names:
        return "no models known: cnnkernels.models has none registered yet"
    return "\n".join(f"{name:<20} baseline: {architecture(name).baseline_label}" for name in names)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `cnnkernels-bench`: parses argv, measures, prints the table and
    writes the JSON and PNG files. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        print(list_models_text())
        return 0
    missing = [name for name in ("matplotlib", "tqdm", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"cnnkernels-bench needs {', '.join(missing)}: pip install 'cnnkernels[bench]' "
                     f"(or pip install {' '.join(missing)})")
    settings = resolve(parser, args)

    from cnnkernels.bench import harness, report

    document = harness.run(settings, progress=not args.no_progress)
    json_path, png_path = report.write_outputs(document, args.output)
    print(report.format_table(document))
    print(f"\nwrote {json_path}\nwrote {png_path}")
    failed = [r for r in document["results"] if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} of {len(document['results'])} runs failed; see the table and the JSON's "
              f"'error' / 'traceback' fields", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
