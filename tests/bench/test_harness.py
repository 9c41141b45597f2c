"""The benchmark harness itself (not speed): variants build with the same weights,
timing and statistics, memory measurement, failure recording, JSON / PNG / table."""
import json
import os
import statistics

import numpy as np
import pytest
import torch

from cnnkernels.bench import architectures, harness, memory, report


def settings(models=("tiny",), variants=("eager", "cnnkernels"), modes=("inference",), iterations=2):
    configs = [harness.Config("cpu", 2, 16, "float32", "contiguous", mode, num_classes=10) for mode in modes]
    return harness.Settings(models=list(models), configs=configs, variants=list(variants),
                            iterations=iterations, warmup=1)


@pytest.fixture(scope="module")
def document(tiny):
    """One small run of the tiny model, inference and train, eager baseline and ours."""
    return harness.run(settings(modes=("inference", "train")), progress=False)


def test_every_variant_runs_and_reports_its_figures(document):
    results = document["results"]
    assert [(r["mode"], r["variant"]) for r in results] == [
        ("inference", "eager"), ("inference", "cnnkernels"), ("train", "eager"), ("train", "cnnkernels")]
    for r in results:
        assert r["status"] == "ok", r.get("traceback")
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
        low, high = r["images_per_s_quartiles"]
        assert low <= r["images_per_s"] <= high
        assert r["first_call_s"] > 0 and r["wall_images_per_s"] > 0
        figures = r["memory"]
        assert figures["step_peak_bytes"] > 0
        assert figures["peak_bytes"] == figures["state_bytes"] + figures["step_peak_bytes"]
        assert "profiler" in figures["method"]
        assert "first_output" not in r  # tensors never reach the JSON
        used = r["cnnkernels_backends_used"]
        if r["variant"] == "eager":
            assert used == {}  # the plain-torch twin calls no cnnkernels op
        else:
            assert sum(used["conv_bn_act"].values()) == 2  # the tiny net's two fused layers


def test_same_weights_give_the_same_logits(document):
    """Ours (fused op) and the plain-torch twin hold the same weights: their first
    outputs agree to float32 precision, in eval and in train (batch statistics)."""
    for r in document["results"]:
        assert r["output_rel_err_vs_eager"] < 1e-5, r


def test_speedups_are_ratios_of_throughput(document):
    by_key = {(r["mode"], r["variant"]): r for r in document["results"]}
    for mode in ("inference", "train"):
        eager, ours = by_key[(mode, "eager")], by_key[(mode, "cnnkernels")]
        assert eager["speedup"] == {"eager": pytest.approx(1.0)}
        assert ours["speedup"]["eager"] == pytest.approx(ours["images_per_s"] / eager["images_per_s"])


def test_state_bytes_count_weights_optimizer_state_and_inputs(document, tiny):
    model = tiny.build_ours(10)
    weights = sum(t.numel() * 4 for t in model.state_dict().values() if t.dtype == torch.float32)
    inputs = harness.INPUT_POOL * 2 * (3 * 16 * 16 * 4 + 8)
    by_key = {(r["mode"], r["variant"]): r for r in document["results"]}
    assert by_key[("inference", "eager")]["memory"]["state_bytes"] >= weights + inputs
    # SGD with momentum keeps one buffer per parameter.
    params = sum(p.numel() * 4 for p in model.parameters())
    assert by_key[("train", "eager")]["memory"]["state_bytes"] >= weights + inputs + params


def test_environment_and_settings_are_recorded(document):
    env = document["environment"]
    for key in ("device", "device_name", "logical_cores", "usable_cores", "threads", "torch", "torchvision",
                "triton", "cuda_build", "python", "cnnkernels", "cnnkernels_extension_loaded", "cnnkernels_info",
                "load_average_at_start"):
        assert key in env, key
    assert env["threads"] == torch.get_num_threads()
    config = document["settings"]["configs"][0]
    assert (config["batch_size"], config["dtype"], config["memory_format"]) == (2, "float32", "contiguous")
    assert document["settings"]["iterations"] == 2
    assert {"timing", "memory", "step", "throughput"} <= set(document["methodology"])
    assert document["architectures"]["tiny"]["baseline"] == "TinyTwin (plain torch)"


def test_json_png_and_table(document, tmp_path):
    json_path, png_path = report.write_outputs(document, tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert loaded["results"][1]["speedup"]["eager"] == pytest.approx(document["results"][1]["speedup"]["eager"])
    assert loaded["environment"]["device"] == "cpu"
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png_path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    table = report.format_table(document)
    header = next(line for line in table.splitlines() if line.startswith("model"))
    for column in ("img/s", "IQR %", "first call s", "peak MiB", "ops on", "x eager"):
        assert column in header
    assert "tiny" in table and "cnnkernels" in table


def test_compiled_variant_and_second_baseline_column(tiny):
    """torch.compile variants run (first call reported apart) and every baseline gets
    its own speedup column."""
    document = harness.run(settings(variants=("eager", "compile", "cnnkernels")), progress=False)
    results = {r["variant"]: r for r in document["results"]}
    assert all(r["status"] == "ok" for r in results.values()), [r.get("traceback") for r in results.values()]
    assert set(results["cnnkernels"]["speedup"]) == {"eager", "compile"}
    assert results["compile"]["output_rel_err_vs_eager"] < 1e-5
    assert results["compile"]["first_call_s"] > results["compile"]["median_s"]  # compiling happened first
    header = next(line for line in report.format_table(document).splitlines() if line.startswith("model"))
    assert "x eager" in header and "x compile" in header


def test_a_failing_variant_is_recorded_and_the_run_goes_on(tiny):
    broken = architectures.Architecture(
        "broken", "a twin with other keys", lambda state, num_classes: torch.nn.Linear(3, num_classes),
        build_ours=tiny.build_ours)
    architectures.register(broken)
    try:
        document = harness.run(settings(models=("broken",)), progress=False)
    finally:
        architectures.TABLE.pop("broken", None)
    eager, ours = document["results"]
    assert eager["status"] == "error"
    assert "missing keys" in eager["error"] and "unexpected keys" in eager["error"]
    assert ours["status"] == "ok" and ours["speedup"] == {} and ours["output_rel_err_vs_eager"] is None
    assert "FAILED" in report.format_table(document)


def test_baseline_backend_is_forced_for_the_baseline_only(tiny):
    """An unfused-twin baseline runs with its backend forced (through the environment,
    so autograd worker threads see it too); ours keeps the default choice."""
    from cnnkernels._backends import forced_backend

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.net = tiny.build_ours(num_classes)

        def forward(self, x):
            seen.append(forced_backend())
            return self.net(x)

    arch = architectures.Architecture("recording", "ours, reference backend",
                                      lambda state, num_classes: Recording(num_classes),
                                      baseline_backend="reference", build_ours=Recording)
    architectures.register(arch)
    try:
        document = harness.run(settings(models=("recording",)), progress=False)
    finally:
        architectures.TABLE.pop("recording", None)
    assert all(r["status"] == "ok" for r in document["results"])
    # cpu: each variant's first call and warm-up in turn, then the timed steps in rounds
    # (baseline, ours, baseline, ours), then each one's memory step
    assert seen == ["reference"] * 2 + [None] * 2 + ["reference", None] * 2 + ["reference", None]
    assert os.environ.get("CNNKERNELS_BACKEND") is None


def test_profiled_peak_bytes_counts_live_allocations():
    def work():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # + 2 MB
        del a
        c = torch.empty(2_000_000)  # + 8 MB -> 10 MB held at once
        del b, c

    assert memory.profiled_peak_bytes(work) == 10_000_000


def test_summary_statistics_match_numpy():
    rng = np.random.default_rng(0)
    times = list(rng.uniform(0.01, 0.02, size=11))
    summary = harness.summarize(times, batch_size=8)
    assert summary["median_s"] == pytest.approx(statistics.median(times))
    assert summary["q1_s"] == pytest.approx(np.percentile(times, 25))
    assert summary["q3_s"] == pytest.approx(np.percentile(times, 75))
    assert summary["std_s"] == pytest.approx(np.std(times, ddof=1))
    assert summary["images_per_s"] == pytest.approx(8 / statistics.median(times))


def test_outputs_with_auxiliary_heads():
    logits, aux = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.randint(0, 5, (4,))
    assert harness.logits_of((logits, aux)) is logits
    expected = torch.nn.functional.cross_entropy(logits, target) + \
        harness.AUX_WEIGHT * torch.nn.functional.cross_entropy(aux, target)
    assert harness.training_loss((logits, aux, None), target) == pytest.approx(expected.item())


def test_build_model_loads_the_same_weights_strictly(tiny):
    state = harness.reference_state(tiny, 10, seed=3)
    baseline = harness.build_model(tiny, harness.VARIANTS["eager"], state, 10)
    for key, value in baseline.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_unknown_model_lists_the_known_ones(tiny):
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known: .*tiny"):
        architectures.architecture("nope")


def test_table_resolves_zoo_names_to_their_twins():
    zoo = architectures.zoo_models()
    if "resnext50" not in zoo:
        pytest.skip("cnnkernels.models has no resnext50 yet")
    assert architectures.architecture("resnext50").baseline_label == "torchvision.models.resnext50_32x4d"
    assert architectures.architecture("se_resnext50").baseline_backend is None
    assert "plain-torch SE" in architectures.architecture("se_resnext50").baseline_label
    for name in ("resnet50", "densenet121", "vgg16", "googlenet"):
        assert architectures.architecture(name).baseline_label == f"torchvision.models.{name}"


def test_frozen_variant_freezes_only_our_model_and_agrees_with_eager(tiny):
    from torch import nn

    from cnnkernels.nn.freeze import is_frozen
    document = harness.run(settings(variants=("eager", "cnnkernels", "cnnkernels-frozen")), progress=False)
    by_variant = {r["variant"]: r for r in document["results"]}
    for name in ("cnnkernels", "cnnkernels-frozen"):
        assert by_variant[name]["status"] == "ok", by_variant[name].get("traceback")
        assert by_variant[name]["output_rel_err_vs_eager"] < 1e-5
    arch, config = architectures.architecture("tiny"), settings().configs[0]
    state = harness.reference_state(arch, config.num_classes, seed=0)
    for name, frozen in (("cnnkernels", False), ("cnnkernels-frozen", True)):
        model = harness.prepare(arch, harness.VARIANTS[name], config, state).model
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(is_frozen(m) == frozen for m in bns)


def test_timed_rounds_interleave_the_steps_and_drop_one_that_fails():
    from cnnkernels.bench.timing import timed_rounds
    order = []

    def step(name, fail_at=None):
        def run(i):
            order.append((name, i))
            if i == fail_at:
                raise RuntimeError("broken at step 1")
        return run
    times, errors = timed_rounds({"a": step("a"), "b": step("b", fail_at=1), "c": step("c")}, 3)
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2)]
    assert [len(times[k]) for k in "abc"] == [3, 1, 3] and errors == {"b": "RuntimeError: broken at step 1"}
