"""`make gpu-check`: one prepared command that proves the kernels on a real GPU in under
9 minutes, and writes what it found under $OUT even when a stage fails or time runs out.

Stages, in order, each with its own time budget (time an earlier stage leaves unused goes
to the later ones; a stage that cannot get its minimum is skipped with a line saying so):
  1. build    the extension in place for sm_90 with all cores; `python -m cnnkernels.info`
  2. tests    pytest tests -m gpu (every op on cuda and triton against cuDNN / torch, models),
              junit XML kept
  3. sanitize compute-sanitizer --tool memcheck over benches/gpu_check_sanitize.py
  4. op-speed benches/gpu_check_ops.py: per-op times at the real layer shapes
  5. models   cnnkernels-bench per architecture (eager, ours, then torch.compile as time allows)
Outputs (at most 8 files): gpu-check.json (every figure, versions, GPU, commit, what
passed and failed), gpu-check.md (tables), gpu-check.log (everything printed),
gpu-tests.xml, sanitizer.log, op-speed.png, models.png.

    python3 benches/gpu_check.py --out "$OUT"              # on the GPU machine
    python3 benches/gpu_check.py --out /tmp/gc --dry-run   # CPU stand-ins, tiny shapes
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import gpu_check_report  # noqa: E402

TOTAL_S = 530  # the device call gets timeout_s 570: 40 s for start-up noise and the last writes
MODELS = ("resnet50", "resnext50", "se_resnext50", "densenet121")


@dataclass
class Stage:
    name: str
    budget_s: float
    minimum_s: float


STAGES = [Stage("build", 140, 40), Stage("tests", 120, 30), Stage("sanitize", 60, 20),
          Stage("op-speed", 80, 20), Stage("models", 122, 30)]
DRY_STAGES = [Stage("build", 120, 5), Stage("tests", 240, 10), Stage("sanitize", 120, 5),
              Stage("op-speed", 240, 10), Stage("models", 300, 10)]


class Run:
    """The run's clock, log and collected results."""

    def __init__(self, out: pathlib.Path, total_s: float, dry_run: bool, stages: list[Stage]):
        self.out, self.dry_run, self.stages = out, dry_run, stages
        self.start = time.time()
        self.deadline = self.start + total_s
        self.log = open(out / "gpu-check.log", "a", buffering=1)
        self.python = sys.executable
        self.scratch = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.result: dict = {"schema": "cnnkernels-gpu-check/1", "dry_run": dry_run, "total_budget_s": total_s,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.time()

    def timeout_for(self, stage: Stage) -> float:
        """Its budget plus what earlier stages left, less what later stages are owed."""
        later = self.stages[self.stages.index(stage) + 1:]
        return self.left() - sum(s.budget_s for s in later)

    def command(self, argv: list[str], timeout: float, env: dict | None = None, tee: pathlib.Path | None = None
                ) -> tuple[int | None, str]:
        """Runs argv (output to the log, stdout and tee); on timeout SIGINT (pytest then
        still writes its report), then SIGKILL. Returns (exit code or None on timeout, output)."""
        self.say(f"$ {' '.join(argv)}   (time limit {timeout:.0f} s)")
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        lines: list[str] = []
        extra = open(tee, "a") if tee else None

        def pump():
            for line in proc.stdout:
                lines.append(line)
                sys.stdout.write(line)
                self.log.write(line)
                if extra:
                    extra.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
        reader.join(timeout=5)
        if extra:
            extra.close()
        return code, "".join(lines)


def _versions(run: Run) -> dict:
    info = {"python": platform.python_version(), "machine": platform.node(), "cores": os.cpu_count(),
            "python_executable": sys.executable}
    try:
        import torch
        info.update(torch=torch.__version__, cuda_build=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                    cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    except Exception as error:
        info["torch_error"] = f"{type(error).__name__}: {error}"
    for name in ("triton", "torchvision"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            try:
                info[name] = __import__(name).__version__
            except Exception as error:
                info[name] = f"import failed: {error}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info["nvcc"] = out[-1] if out else None
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(git + ["status", "--porcelain"], capture_output=True, text=True, timeout=10)
        info["commit"] = commit.stdout.strip() or None
        info["dirty"] = bool(dirty.stdout.strip()) if commit.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    info["commit"] = info.get("commit") or os.environ.get("CNNKERNELS_COMMIT") or "unknown (no git here)"
    return info


def stage_build(run: Run, timeout: float) -> dict:
    end = time.time() + timeout
    if run.dry_run:
        run.say("build: dry run: the extension `make install` built stands in for the sm_90 build")
        code, _ = run.command([run.python, "-c", "import cnnkernels._C"], timeout)
        build = {"status": "ok" if code == 0 else "failed", "stand_in": True}
    else:
        env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 1)}
        begin = time.time()
        code, _ = run.command([run.python, "setup.py", "build_ext", "--inplace"], timeout - 20, env)
        build = {"status": "ok" if code == 0 else ("timed out" if code is None else "failed"),
                 "build_s": round(time.time() - begin, 1), "arch": "9.0", "jobs": env["MAX_JOBS"]}
        run.say(f"build: {build['status']} in {build['build_s']} s (sm_90, {env['MAX_JOBS']} jobs)")
    code, text = run.command([run.python, "-m", "cnnkernels.info"], min(60, max(end - time.time(), 5)))
    build["info"] = text[-6000:]
    build["info_status"] = "ok" if code == 0 else "failed"
    return build


def _junit_summary(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {"junit": "missing"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (node.get("message") or "")[:400]})
    counts["failed_tests"] = failed
    return counts


def stage_tests(run: Run, timeout: float) -> dict:
    xml = run.out / "gpu-tests.xml"
    argv = [run.python, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rfE", "--tb=short",
            "-p", "no:cacheprovider", f"--junitxml={xml}"]
    workers = min(8, os.cpu_count() or 1)
    if importlib.util.find_spec("xdist") is not None and workers > 1 and not run.dry_run:
        argv += ["-n", str(workers)]
    code, _ = run.command(argv, timeout, {"CNNKERNELS_REQUIRE_EXTENSION": "1"})
    summary = _junit_summary(xml)
    summary["exit_code"] = code
    summary["status"] = ("timed out" if code is None else "ok" if code == 0 else "failed")
    if run.dry_run:
        summary["stand_in"] = "no GPU: the GPU tests are collected and skip"
    return summary


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


def stage_sanitize(run: Run, timeout: float) -> dict:
    log = run.out / "sanitizer.log"
    script = [run.python, "benches/gpu_check_sanitize.py"]
    if run.dry_run:
        code, text = run.command(script + ["--device", "cpu", "--backends", "cpu", "--layers", "3",
                                           "--formats", "fp32-cl"], timeout, tee=log)
        result = {"stand_in": "the runs on the cpu backend, without compute-sanitizer"}
    else:
        tool = _sanitizer()
        if tool is None:
            return {"status": "skipped", "why": "compute-sanitizer not found on PATH or in CUDA_HOME/bin"}
        code, text = run.command([tool, "--tool", "memcheck", "--report-api-errors", "no", "--print-limit", "50",
                                  "--error-exitcode", "3"] + script, timeout, tee=log)
        result = {"tool": tool}
    summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
    result.update(exit_code=code, runs_ok=text.count("sanitize-run ok"), runs_failed=text.count("sanitize-run FAILED"),
                  error_summary=summary[-1].strip() if summary else None,
                  status="timed out" if code is None else "ok" if code == 0 else "failed")
    return result


def stage_op_speed(run: Run, timeout: float) -> dict:
    path = run.scratch / "ops.json"
    argv = [run.python, "benches/gpu_check_ops.py", "--out", str(path), "--deadline", str(time.time() + timeout - 25)]
    argv += ["--device", "cpu", "--dry-run"] if run.dry_run else ["--device", "cuda"]
    code, _ = run.command(argv, timeout)
    document = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    document["exit_code"] = code
    document["status"] = "timed out" if code is None else "ok" if code == 0 else "failed"
    return document


def _bench(run: Run, model: str, variants: str, modes: str, timeout: float) -> list[dict]:
    folder = run.scratch / f"bench-{model}-{variants.replace(',', '+')}-{modes.replace(',', '+')}"
    argv = [run.python, "-m", "cnnkernels.bench", "--models", model, "--variants", variants, "--mode", modes,
            "--output", str(folder), "--no-progress"]
    if run.dry_run:
        argv += ["--device", "cpu", "--batch-size", "2", "--image-size", "32", "--iterations", "1", "--warmup", "0"]
    else:
        argv += ["--device", "cuda", "--batch-size", "256", "--dtype", "bfloat16", "--memory-format",
                 "channels_last", "--iterations", "10", "--warmup", "3"]
    code, _ = run.command(argv, timeout)
    records = []
    for path in sorted(folder.glob("*.json")):
        document = json.loads(path.read_text())
        run.result.setdefault("bench_environment", document.get("environment"))
        records += document["results"]
    if not records:
        why = "timed out" if code is None else f"exit code {code}, no results written"
        records = [{"model": model, "variant": v, "mode": m, "status": "error", "error": why}
                   for v in variants.split(",") for m in modes.split(",")]
    return records


def stage_models(run: Run, timeout: float) -> dict:
    """Eager and ours for every model first, then compile inference, then compile train,
    each run in its own process, while the stage's time lasts."""
    end = time.time() + timeout
    models = MODELS[:1] if run.dry_run else MODELS
    plan = [(m, "eager,cnnkernels", "inference,train") for m in models]
    if not run.dry_run:
        plan += [(m, "compile", "inference") for m in models] + [(m, "compile", "train") for m in models]
    records, skipped = [], []
    for model, variants, modes in plan:
        left = end - time.time()
        if left < 20:
            skipped.append(f"{model} {variants} {modes}")
            run.say(f"models: skipped {model} {variants} {modes}: {left:.0f} s left of the stage")
            continue
        records += _bench(run, model, variants, modes, left)
    if run.dry_run:
        skipped.append("torch.compile of whole models: not in the dry run (minutes on 2 CPU cores)")
    failed = [r for r in records if r.get("status") != "ok"]
    return {"records": records, "skipped": skipped, "status": "failed" if failed else "ok",
            "settings": "dry run: cpu, batch 2, 32x32, 1 iteration" if run.dry_run else
            "cuda, batch 256, bfloat16 autocast, channels_last, 3 warm-up + 10 timed steps, cudnn.benchmark on"}


RUNNERS = {"build": stage_build, "tests": stage_tests, "sanitize": stage_sanitize, "op-speed": stage_op_speed,
           "models": stage_models}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins at tiny shapes (runs in make test)")
    parser.add_argument("--total", type=float, help=f"seconds for the whole run (default {TOTAL_S}; dry run 1020)")
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = DRY_STAGES if args.dry_run else STAGES
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - set(RUNNERS)
        if unknown:
            parser.error(f"--only: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(RUNNERS)}")
        stages = [s for s in stages if s.name in wanted]
    run = Run(args.out, args.total or (TOTAL_S if not args.dry_run else sum(s.budget_s for s in stages)),
              args.dry_run, stages)
    run.result["environment"] = _versions(run)
    run.say(f"gpu-check{' (dry run)' if args.dry_run else ''}: {run.result['environment'].get('gpu', 'no GPU')}, "
            f"torch {run.result['environment'].get('torch')}, triton {run.result['environment'].get('triton')}, "
            f"commit {run.result['environment']['commit']}, budget {run.deadline - run.start:.0f} s")
    if not args.dry_run and not run.result["environment"].get("cuda_available"):
        run.say("gpu-check: no CUDA device visible; nothing to check (use --dry-run for the CPU stand-ins)")
        run.result["error"] = "no CUDA device"
    for stage in stages:
        timeout = min(run.timeout_for(stage), run.left() - 5)
        if "error" in run.result or timeout < stage.minimum_s:
            why = run.result.get("error") or f"only {max(timeout, 0):.0f} s left for it (needs {stage.minimum_s:.0f} s)"
            run.say(f"== stage {stage.name}: SKIPPED: {why}")
            run.result["stages"][stage.name] = {"status": "skipped", "why": why}
            continue
        run.say(f"== stage {stage.name}: up to {timeout:.0f} s ({run.left():.0f} s left in the run)")
        begin = time.time()
        try:
            result = RUNNERS[stage.name](run, timeout)
        except Exception as error:  # one broken stage must not cost the others
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.time() - begin, 1)
        run.result["stages"][stage.name] = result
        run.say(f"== stage {stage.name}: {result['status'].upper()} in {result['seconds']} s")
        gpu_check_report.write(run.result, run.out, plots=False)
    run.result["seconds"] = round(time.time() - run.start, 1)
    paths = gpu_check_report.write(run.result, run.out, plots=True)
    run.say(gpu_check_report.summary(run.result))
    run.say("wrote " + ", ".join(str(p) for p in paths))
    shutil.rmtree(run.scratch, ignore_errors=True)
    bad = [name for name, s in run.result["stages"].items() if s["status"] not in ("ok",)]
    return 1 if bad or "error" in run.result else 0


if __name__ == "__main__":
    sys.exit(main())
