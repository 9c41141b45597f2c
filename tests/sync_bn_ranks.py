"""The two-rank SyncBatchNorm runs: starts tests/nn/sync_bn_worker.py as rank 0 and 1 on
gloo (tests/nn/test_sync_batchnorm.py) or nccl (tests/gpu/test_sync_batchnorm_nccl.py) and
checks what each rank measured."""
import json
import os
import pathlib
import subprocess
import sys

WORKER = pathlib.Path(__file__).resolve().parent / "nn" / "sync_bn_worker.py"
CHECKS = [
    "resnet18: parameters and buffers against one process", "resnet18: parameters and buffers across ranks",
    "densenet: parameters and buffers against one process", "densenet: parameters and buffers across ranks",
    "resnet18 vs torchvision: outputs", "resnet18 vs torchvision: gradients",
    "resnet18 vs torchvision: running statistics",
    *(f"{case}: {what}" for case in ("batches 3 and 1", "an empty batch")
      for what in ("outputs", "input gradients", "parameter gradients summed over ranks", "running statistics")),
]


def run_ranks(folder: pathlib.Path, backend: str = "gloo") -> list[dict]:
    """Starts the worker's two ranks on `backend` and returns each one's {check: max difference}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(folder / "store"),
                               str(folder / "result"), backend], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for rank in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [json.loads((folder / f"result.{rank}").read_text()) for rank in range(2)]


def assert_checks_pass(ranks: list[dict], check: str, bound: float = 1e-9) -> None:
    for rank, results in enumerate(ranks):
        assert check in results, f"rank {rank} did not run {check!r}"
        assert results[check] < bound, f"rank {rank}: {check}: max difference {results[check]:.3g}"
