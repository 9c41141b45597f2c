"""The CPU baselines issue 13 compares against: torch.compile with Inductor freezing and
OpenVINO's CPU plugin run the baseline model with the same weights as the others (their
logits agree with eager's), inference only; the environment records the CPU flags."""
import builtins

import pytest

from cnnkernels.bench import environment, harness, report
from helpers import skip_or_fail


def _run(variants, mode="inference", dtype="float32"):
    config = harness.Config("cpu", 2, 16, dtype, "channels_last", mode, num_classes=10)
    return harness.run(harness.Settings(models=["tiny"], configs=[config], variants=list(variants), iterations=2,
                                        warmup=1), progress=False)


@pytest.mark.slow
def test_compile_freezing_and_openvino_run_the_baseline_with_the_same_weights(tiny):
    try:
        import openvino  # noqa: F401
    except ImportError:
        skip_or_fail("openvino is not installed (requirements-dev.txt installs it for make test)")
    document = _run(["eager", "compile-freezing", "openvino"])
    by_variant = {r["variant"]: r for r in document["results"]}
    for name in ("compile-freezing", "openvino"):
        record = by_variant[name]
        assert record["status"] == "ok", record.get("traceback")
        assert record["output_rel_err_vs_eager"] < 1e-4
        assert record["speedup"]["eager"] > 0
    assert "x compile-freezing" in report.format_table(document) and "x openvino" in report.format_table(document)


def test_openvino_is_skipped_with_its_reason_in_training_and_without_the_package(tiny, monkeypatch):
    (train,) = _run(["openvino"], mode="train")["results"]
    assert train["status"] == "skipped" and "inference only" in train["error"]
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_openvino)
    document = _run(["eager", "openvino"])
    skipped = document["results"][1]
    assert skipped["status"] == "skipped" and "pip install openvino" in skipped["error"]
    assert "skipped: openvino is not installed" in report.format_table(document)


def test_environment_records_the_cpu_flags():
    flags = environment.cpu_flags()
    assert set(flags) == set(environment.CPU_FLAGS) and all(isinstance(v, bool) for v in flags.values())
    assert environment.describe("cpu")["cpu_flags"] == flags
