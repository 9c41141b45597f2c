"""cnnkernels-bench's cpu timing: paired speedups (per-round ratios of steps timed in the
same round, their median and its distribution-free 95% interval, in the JSON and the
table), and first calls timed only once the process is idle."""
import math
import random
import statistics
import threading
import time

import pytest

from cnnkernels.bench import harness, report, timing


def _coverage(n: int, k: int) -> float:
    """Coverage of [x_(k), x_(n-k+1)] for the median: 1 - 2 P(Binomial(n, 1/2) <= k - 1)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n


@pytest.mark.parametrize("n", range(1, 61))
def test_median_interval_is_the_narrowest_with_95_percent_coverage(n):
    bounds = timing.median_interval(n)
    if _coverage(n, 1) < 0.95:
        assert bounds is None
        return
    lo, hi = bounds
    k = lo + 1
    assert hi == n - k
    assert _coverage(n, k) >= 0.95
    assert k == n // 2 or _coverage(n, k + 1) < 0.95


def test_interval_covers_the_true_median_as_often_as_it_claims():
    rng = random.Random(0)
    trials, n, true_median = 2000, 20, 1.0
    covered = 0
    for _ in range(trials):
        ratios = [math.exp(rng.gauss(0.0, 0.1)) for _ in range(n)]  # log-normal, median exactly 1
        baseline = [rng.uniform(0.5, 3.0) for _ in range(n)]
        times = [b / r for b, r in zip(baseline, ratios)]
        lo, hi = timing.paired_speedup(baseline, times)["ci95"]
        covered += lo <= true_median <= hi
    # exact coverage at n=20 is 1 - 2 P(B <= 5) = 0.9586; 2000 trials: +-0.0089 standard error
    assert 0.93 < covered / trials < 0.99


def test_pairing_cancels_load_shared_by_a_round():
    """A load burst slows both variants of a round alike: the per-round ratios keep the
    true 1.05 while the step times themselves spread over a factor of 4."""
    rng = random.Random(1)
    load = [rng.uniform(1.0, 4.0) for _ in range(12)]
    baseline, ours = [1.05 * f for f in load], [1.0 * f for f in load]
    paired = timing.paired_speedup(baseline, ours)
    assert paired["median"] == pytest.approx(1.05)
    assert paired["ci95"] == pytest.approx([1.05, 1.05])
    assert paired["rounds"] == 12 and paired["wins"] == 12


def test_unpaired_or_empty_rounds_give_no_figure():
    assert timing.paired_speedup([1.0, 2.0], [1.0]) is None
    assert timing.paired_speedup([], []) is None
    few = timing.paired_speedup([2.0, 2.0, 2.0], [1.0, 1.0, 4.0])
    assert few["median"] == 2.0 and few["ci95"] is None and few["wins"] == 2


@pytest.fixture(scope="module")
def document(tiny):
    configs = [harness.Config("cpu", 2, 16, "float32", "contiguous", "inference", num_classes=10)]
    settings = harness.Settings(models=["tiny"], configs=configs, variants=["eager", "cnnkernels"],
                                iterations=10, warmup=1)
    return harness.run(settings, progress=False)


def test_the_document_holds_paired_figures_from_the_rounds(document):
    eager, ours = document["results"]
    paired = ours["paired_speedup"]["eager"]
    ratios = sorted(b / t for b, t in zip(eager["times_s"], ours["times_s"]))
    assert paired["rounds"] == 10 and paired["median"] == pytest.approx(statistics.median(ratios))
    assert paired["ci95"] == pytest.approx([ratios[1], ratios[8]])  # n=10: x_(2), x_(9), coverage 97.9 %
    assert paired["wins"] == sum(r > 1 for r in ratios)
    assert eager["paired_speedup"]["eager"]["median"] == pytest.approx(1.0)
    assert "paired_speedup" in document["methodology"]


def test_the_table_shows_the_interval_beside_the_ratio_of_medians(document):
    ours = document["results"][1]
    lo, hi = ours["paired_speedup"]["eager"]["ci95"]
    row = next(line for line in report.format_table(document).splitlines() if "cnnkernels" in line
               and line.split()[0] in ("cnnkernels", "tiny"))
    assert row.rstrip().endswith(f"{ours['speedup']['eager']:.2f} [{lo:.2f}, {hi:.2f}]")
    eager_row = next(line for line in report.format_table(document).splitlines() if line.startswith("tiny"))
    assert "[" not in eager_row  # a baseline against itself gets no interval


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end and time.perf_counter() < _burn.deadline:
        sum(range(1000))


def test_first_calls_wait_for_the_process_to_be_idle():
    """A first call is timed only once no thread of the process is busy (OpenVINO's
    compile threads run on for seconds), at most max_s later."""
    assert timing.wait_until_idle(max_s=2.0) < 0.5
    for load_s, max_s, low, high in ((0.4, 5.0, 0.3, 2.0), (10.0, 0.3, 0.3, 1.0)):
        _burn.deadline = time.perf_counter() + load_s + 0.5
        thread = threading.Thread(target=_burn, args=(load_s,))
        thread.start()
        try:
            waited = timing.wait_until_idle(max_s=max_s)
        finally:
            _burn.deadline = 0.0
            thread.join()
        assert low <= waited <= high, (load_s, max_s, waited)


def test_the_document_records_how_long_each_first_call_waited(document):
    for record in document["results"]:
        assert 0.0 < record["first_call_settled_s"] < 5.5
