"""The `cnnkernels-bench` command line: a tiny end-to-end run, --help, and clear errors
for bad flags."""
import json
import pathlib
import sys

import pytest
import torch

from cnnkernels.bench import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_main(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr); argparse's SystemExit becomes a status."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def retained(monkeypatch):
    """Records --cpu-malloc's calls instead of changing this test process's malloc."""
    from cnnkernels.nn import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "retain_freed_cpu_memory", lambda: calls.append(True) or True)
    return calls


@pytest.mark.parametrize("flag, applied, line", [
    ([], [True], "freed memory retained for reuse"),
    (["--cpu-malloc", "unchanged"], [], "malloc as configured (no reuse setting made)")])
def test_cpu_malloc_choice(tiny, retained, flag, applied, line):
    settings = cli.resolve(cli.build_parser(), cli.build_parser().parse_args(["--models", "tiny", "--device", "cpu"]
                                                                             + flag))
    assert retained == applied
    assert settings.extra["cpu_malloc"].startswith(line)


def test_tiny_end_to_end(tiny, tmp_path, capsys, retained):
    status, out, err = run_main(["--models", "tiny", "--device", "cpu", "--image-size", "16", "--batch-size", "2",
                                 "--iterations", "2", "--warmup", "0", "--variants", "eager,cnnkernels",
                                 "--mode", "inference,train", "--num-classes", "10", "--threads", "1",
                                 "--output", str(tmp_path), "--no-progress"], capsys)
    assert status == 0, out + err
    header = [line for line in out.splitlines() if line.startswith("model")]
    assert len(header) == 2 and all("x eager" in line for line in header)  # one table per mode
    (json_path,) = tmp_path.glob("cnnkernels-bench-cpu-*.json")
    (png_path,) = tmp_path.glob("cnnkernels-bench-cpu-*.png")
    assert f"wrote {json_path}" in out and f"wrote {png_path}" in out
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(json_path.read_text())
    assert document["environment"]["threads"] == 1
    assert retained == [True]
    retained_line = "freed memory retained for reuse, every variant"
    assert document["settings"]["cpu_malloc"].startswith(retained_line) and f"CPU memory: {retained_line}" in out
    assert [(r["mode"], r["variant"], r["status"]) for r in document["results"]] == [
        ("inference", "eager", "ok"), ("inference", "cnnkernels", "ok"),
        ("train", "eager", "ok"), ("train", "cnnkernels", "ok")]
    for r in document["results"]:
        assert (r["batch_size"], r["image_size"], r["dtype"], r["memory_format"]) == (2, 16, "float32", "contiguous")
        assert len(r["times_s"]) == 2 and "eager" in r["speedup"]


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads changes torch's global thread count; restore it for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_help_documents_flags_defaults_and_methods(capsys):
    status, out, _ = run_main(["--help"], capsys)
    assert status == 0
    for text in ("--models", "--batch-size", "--dtype", "--memory-format", "--mode", "--device", "--threads",
                 "--iterations", "--output", "resnet50", "batch 256", "max_memory_allocated", "profile_memory",
                 "CUDA events", "rotating inputs", "12-13 minutes", "--cpu-malloc", "page-faults"):
        assert text in out, text


@pytest.mark.parametrize("argv, message", [
    (["--models", "nope"], "unknown model 'nope'; known: "),
    (["--dtype", "float8"], "--dtype 'float8': choose from float32, bfloat16, float16"),
    (["--mode", "serve"], "--mode 'serve': choose from inference, train"),
    (["--memory-format", "nhwc"], "--memory-format 'nhwc': choose from contiguous, channels_last"),
    (["--variants", "jit"], "--variants 'jit': choose from eager, compile"),
    (["--backend", "gpu"], "--backend 'gpu': choose one of reference, cpu, triton, cuda"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--batch-size", "1", "--mode", "train"], "--mode train needs --batch-size >= 2"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--batch-size", "eight"], "--batch-size: invalid int value: 'eight'"),
    (["--cpu-malloc", "jemalloc"], "--cpu-malloc: invalid choice: 'jemalloc'"),
])
def test_bad_flags_give_clear_errors(tiny, argv, message, capsys):
    status, _, err = run_main(["--models", "tiny"] + argv if argv[0] != "--models" else argv, capsys)
    assert status == 2
    assert message in err, err


def test_unknown_model_lists_known_ones(tiny, capsys):
    _, _, err = run_main(["--models", "tiny,resnet9000"], capsys)
    known = err.split("known: ", 1)[1]
    assert "tiny" in known
    from cnnkernels.bench.architectures import zoo_models

    for name in zoo_models():
        assert name in known, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda(tiny, capsys):
    status, _, err = run_main(["--models", "tiny", "--device", "cuda"], capsys)
    assert status == 2 and "CUDA is not available" in err


def test_list_models(tiny, capsys):
    status, out, _ = run_main(["--list-models"], capsys)
    assert status == 0
    assert "tiny" in out and "TinyTwin (plain torch)" in out


def test_console_script_is_declared():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["cnnkernels-bench"] == "cnnkernels.bench.cli:main"
    assert "cnnkernels.bench" in project["tool"]["setuptools"]["packages"]
    for dependency in ("matplotlib", "tqdm"):
        assert any(d.startswith(dependency) for d in project["project"]["optional-dependencies"]["bench"]), dependency
        assert not any(d.startswith(dependency) for d in project["project"]["dependencies"]), dependency


def test_missing_bench_dependency_is_named(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--models", "resnet50"])
    assert exit_info.value.code == 2
    assert "cnnkernels-bench needs tqdm: pip install 'cnnkernels[bench]'" in capsys.readouterr().err


def test_import_cnnkernels_loads_no_plotting_or_progress_bars():
    import subprocess
    import sys

    code = ("import sys, torch; before = set(sys.modules); import cnnkernels; "  # torch itself may load tqdm
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('matplotlib', 'tqdm')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
