"""`make gpu-check`'s script, tested where CI runs: the dry run (every stage's CPU stand-in
at tiny shapes) end to end through the Makefile, a run with no time left, and the stage
runner's time limit."""
import json
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benches"))

import gpu_check  # noqa: E402
import gpu_check_report  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"PYTHON={sys.executable}", f"OUT={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_passes_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "gpu-check.json").read_text())
    assert result["dry_run"] is True
    assert list(result["stages"]) == ["build", "tests", "sanitize", "op-speed", "models"]
    assert {name: s["status"] for name, s in result["stages"].items()} == dict.fromkeys(result["stages"], "ok")
    assert result["environment"]["torch"] and result["environment"]["commit"]
    assert "gpu-check summary:" in proc.stdout


def test_dry_run_outputs(dry_run):
    _, out = dry_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu-check.json", "gpu-check.log", "gpu-check.md", "gpu-tests.xml", "models.png",
                     "op-speed.png", "sanitizer.log"]
    assert len(names) <= 8  # what the device tool brings back
    result = json.loads((out / "gpu-check.json").read_text())
    tests = result["stages"]["tests"]
    assert tests["tests"] > 100 and tests["skipped"] == tests["tests"]  # every GPU test collected, and skips here
    sanitize = result["stages"]["sanitize"]
    assert sanitize["runs_ok"] == 6 and sanitize["runs_failed"] == 0
    rows = result["stages"]["op-speed"]["rows"]
    assert {r["op"] for r in rows} == {"conv_bn_act", "add_act", "se_excite", "bn_act_conv"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    assert any(r["variant"] == "torch_compile" for r in rows)
    records = result["stages"]["models"]["records"]
    assert {(r["variant"], r["mode"]) for r in records} == {(v, m) for v in ("eager", "cnnkernels")
                                                            for m in ("inference", "train")}
    md = (out / "gpu-check.md").read_text()
    for heading in ("## Stages", "## GPU tests", "## compute-sanitizer memcheck", "## Per-op speed", "## Models"):
        assert heading in md
    assert (out / "op-speed.png").read_bytes()[:4] == b"\x89PNG"


def test_no_time_left_skips_every_stage_and_still_writes(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--dry-run", "--total", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert all(s["status"] == "skipped" and "left for it" in s["why"] for s in result["stages"].values())
    assert proc.stdout.count("SKIPPED") == 5
    assert "## Stages" in (tmp_path / "gpu-check.md").read_text()


def test_stage_budgets_fit_the_device_call():
    assert sum(s.budget_s for s in gpu_check.STAGES) <= gpu_check.TOTAL_S <= 540  # 9 minutes
    assert all(s.minimum_s <= s.budget_s for s in gpu_check.STAGES)


def test_command_time_limit_interrupts(tmp_path):
    run = gpu_check.Run(tmp_path, 60, True, gpu_check.DRY_STAGES)
    begin = time.time()
    code, text = run.command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    assert code is None and "started" in text and time.time() - begin < 30


def test_later_stages_keep_their_budget(tmp_path):
    stages = [gpu_check.Stage("a", 10, 1), gpu_check.Stage("b", 20, 1), gpu_check.Stage("c", 30, 1)]
    run = gpu_check.Run(tmp_path, 100, True, stages)
    assert run.timeout_for(stages[0]) == pytest.approx(50, abs=1)  # its 10 + 40 unbudgeted
    assert run.timeout_for(stages[2]) == pytest.approx(100, abs=1)


def test_report_flags_a_default_slower_than_eager():
    stage = {"rows": [{"layer": "L", "op": "conv_bn_act", "mode": "eval", "variant": v, "status": "ok",
                       "median_ms": ms} for v, ms in (("torch_eager", 1.0), ("ours_cuda", 2.0), ("ours_triton", 0.5))],
             "defaults": {"L": {"eval": {"backend": "cuda", "kernel": "cudnn_epilogue"}}}}
    (row,) = gpu_check_report.op_speed_rows(stage)
    assert row["default_vs_eager"] == 0.5 and row["best_backend"] == "triton"
    assert row["vs_eager"] == {"ours_cuda": 0.5, "ours_triton": 2.0}
    md = gpu_check_report.markdown({"stages": {"op-speed": stage}})
    assert "0.50 !" in md
