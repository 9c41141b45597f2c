"""cnnkernels.nn.cpu_memory: freed CPU memory kept for reuse (no page faults per call), and
freeze's use of it. The process-wide effect is measured in child processes, so this test
process keeps glibc's defaults."""
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from cnnkernels.nn import cpu_memory, freeze

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Six rounds of: allocate and write six 20 MiB tensors, free them. Prints the fewest minor
# page faults of the last three rounds (120 MiB is 30,720 pages of 4 KiB). glibc's own
# thresholds adapt to the program, and for this pattern sometimes settle on reuse, so the
# child first fixes them at glibc's start values (mmap threshold 128 KiB): every block is
# then mapped afresh each round, unless retain_freed_cpu_memory() changes that. The fewest,
# since the host may reclaim a retained page now and then (DAMON on some VMs).
FAULTS_SCRIPT = """
import ctypes, resource, sys, torch
from cnnkernels.nn import cpu_memory
assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
if sys.argv[1] == "retain":
    assert cpu_memory.retain_freed_cpu_memory()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(20 << 20, dtype=torch.uint8).fill_(1) for _ in range(6)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[3:]))
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if k not in cpu_memory._USER_SETTINGS and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_retained_memory_takes_no_page_faults():
    default, retained = _faults("default"), _faults("retain")
    assert default > 20000, f"with glibc's start thresholds the blocks are mapped afresh each round: {default} faults"
    assert retained < 1000, f"retained: {retained} faults in the best of the last rounds"


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(cpu_memory, "_libc", lambda: libc)
    monkeypatch.setattr(cpu_memory, "_applied", None)
    for name in cpu_memory._USER_SETTINGS + ("LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_sets_both_thresholds_once(fake_libc):
    assert cpu_memory.retain_freed_cpu_memory(1 << 28)
    assert fake_libc.calls == [(-3, 32 << 20), (-1, 1 << 28)]
    assert cpu_memory.retain_freed_cpu_memory(1 << 27)  # already in force with more kept
    assert len(fake_libc.calls) == 2
    assert cpu_memory.retain_freed_cpu_memory(1 << 29)  # a larger threshold is set
    assert fake_libc.calls[-1] == (-1, 1 << 29)


def test_refused_setting_is_reported(fake_libc):
    fake_libc.result = 0
    assert not cpu_memory.retain_freed_cpu_memory()
    assert cpu_memory._applied is None


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                                         ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"),
                                         ("LD_PRELOAD", "libtcmalloc_minimal.so"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_users_allocator_choice_stands(fake_libc, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert not cpu_memory.retain_freed_cpu_memory()
    assert fake_libc.calls == []


def test_no_glibc_changes_nothing(fake_libc, monkeypatch):
    monkeypatch.setattr(cpu_memory, "_libc", lambda: None)
    assert not cpu_memory.retain_freed_cpu_memory()
    assert cpu_memory._applied is None


@pytest.mark.parametrize("bad", [True, 1.5e9, (32 << 20) - 1, 2**31, "1G"])
def test_bad_trim_threshold(fake_libc, bad):
    with pytest.raises(ValueError, match="trim_threshold must be an int"):
        cpu_memory.retain_freed_cpu_memory(bad)
    assert fake_libc.calls == []


def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_freeze_retains_for_cpu_models_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "retain_freed_cpu_memory", lambda: calls.append(1) or True)
    freeze(_conv_bn(), retain_freed_memory=False)
    assert calls == []
    freeze(_conv_bn())
    assert calls == [1]
    freeze(nn.Sequential(nn.Conv2d(3, 4, 3).to("meta")))  # no CPU tensor: nothing to retain for
    assert calls == [1]
    with pytest.raises(TypeError, match="retain_freed_memory must be a bool"):
        freeze(_conv_bn(), retain_freed_memory=1)

