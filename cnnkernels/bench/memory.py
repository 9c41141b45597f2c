"""Peak memory of a benchmark step, and how it is measured (MEMORY_METHOD, written
into every JSON file).

CUDA has allocator statistics (max_memory_allocated); the harness reads them around
the timed loop. The CPU allocator keeps none, so on CPU the peak of one step is summed
from torch.profiler's memory events, which every allocation through torch's CPU
allocator emits (eager tensors, oneDNN scratch through ideep, buffers of
torch.compile's generated code), and the state held across steps is counted from the
model, optimizer and inputs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

MEMORY_METHOD = {
    "cpu": ("peak_bytes = state_bytes + step_peak_bytes. step_peak_bytes: the most bytes held at once by "
            "the allocations that one step makes through torch's CPU allocator (tensors, oneDNN scratch "
            "through ideep, buffers of compiled code), summed from torch.profiler's memory events "
            "(profile_memory=True) over one extra step after the timed ones; memory allocated before "
            "that step (weights, inputs, last step's gradients) is not counted in it, not even when the "
            "step frees it. state_bytes: parameters, buffers, optimizer state and the input pool. Not "
            "counted: caches kept outside module state and allocator or process (RSS) overheads."),
    "cuda": ("peak_bytes: torch.cuda.max_memory_allocated() over the timed loop, after "
             "torch.cuda.reset_peak_memory_stats() (every tensor alive at the peak: weights, gradients, "
             "optimizer state, inputs, activations, workspaces; not the allocator's cached free blocks). "
             "state_bytes: torch.cuda.memory_allocated() when the timed loop starts; "
             "step_peak_bytes = peak_bytes - state_bytes."),
}

def tensor_bytes(tensors) -> int:
    """Sum of the storage bytes of the distinct tensors given (None skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, inputs) -> int:
    """Bytes of the model's parameters and buffers, the optimizer's state and the input
    pool (a sequence of tensor tuples)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for per_param in optimizer.state.values():
            tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    for batch in inputs:
        tensors.extend(batch)
    return tensor_bytes(tensors)


# Lines the profiler's C++ side (kineto) prints on every start and stop, and the
# allocator's note that frees of older memory are not seen (documented in MEMORY_METHOD).
PROFILER_CHATTER = ("USDT:", "STAGE:", "gpuGetDeviceCount failed", "Memory block of unknown size")


@contextlib.contextmanager
def _filtered_stderr(drop: Sequence[str]) -> Iterator[None]:
    """Captures what C++ code writes to file descriptor 2 during the block and writes
    it back afterwards, less the lines containing any of `drop`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(marker in line for marker in drop)]
            if kept:
                sys.stderr.write("".join(kept))


def profiled_peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes held at once by the CPU-allocator allocations fn() makes, from
    torch.profiler's memory events (frees of older memory are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with _filtered_stderr(PROFILER_CHATTER):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak
