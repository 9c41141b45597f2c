"""benches/bench_densenet_memory.py on a small DenseNet: what it measures behaves as the
issue's targets say (ours linear in depth and well below torchvision), and it plots."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_densenet_memory", ROOT / "benches" / "bench_densenet_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep(bench):
    rows = []
    for depth in (2, 4, 8):
        config = dict(growth_rate=8, block_config=(depth, depth), num_init_features=16)
        rows.append({"depth": depth, "results": bench.measure(bench.VARIANTS, config, 2, 64, 1, "cpu")})
    return rows


def _growth_ratio(sweep, variant):
    """(saved(8) - saved(4)) / (saved(4) - saved(2)): 2 when linear in depth, more when quadratic."""
    s2, s4, s8 = (row["results"][variant]["saved_bytes"] for row in sweep)
    return (s8 - s4) / (s4 - s2)


def test_ours_grows_linearly_where_torchvision_grows_quadratically(sweep):
    assert _growth_ratio(sweep, "torchvision") > 2.4
    for variant in ("ours", "ours_memory_efficient"):
        assert 1.8 < _growth_ratio(sweep, variant) < 2.2, variant


def test_ours_holds_less_than_half_of_torchvision_plain(sweep):
    deepest = sweep[-1]["results"]
    for variant in ("ours", "ours_memory_efficient"):
        assert deepest[variant]["saved_bytes"] < 0.5 * deepest["torchvision"]["saved_bytes"], variant
    assert deepest["ours_memory_efficient"]["saved_bytes"] < deepest["torchvision_memory_efficient"]["saved_bytes"]
    for result in deepest.values():
        assert result["peak_bytes"] > 0 and result["time_s"] > 0


def test_plot_is_written(bench, sweep, tmp_path):
    bench.plot(sweep, tmp_path / "densenet_memory.png")
    assert (tmp_path / "densenet_memory.png").stat().st_size > 10_000
