"""The environment a benchmark ran in: device, cores, threads, load, versions, and
cnnkernels' own report of which backends can run here."""
from __future__ import annotations

import os
import platform
import sys

import torch

def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", None)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
"""The instruction-set flags that decide which CPU kernels oneDNN (and so every CPU engine
here) can use: figures are comparable only between machines with the same ones."""


def cpu_flags() -> dict[str, bool]:
    """{flag: present} for CPU_FLAGS, from /proc/cpuinfo (all False where it is unreadable)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {flag: flag in flags for flag in CPU_FLAGS}


def describe(device: str) -> dict:
    """Device name, cores, threads, versions (python, torch, torchvision, triton, CUDA,
    cuDNN, cnnkernels) and cnnkernels' backend report."""
    import cnnkernels
    from cnnkernels import _library, info

    cuda = torch.device(device).type == "cuda"
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "openvino": _version("openvino"),
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cnnkernels": cnnkernels.__version__,
        "cnnkernels_extension_loaded": _library.extension_loaded(),
        "cnnkernels_extension_error": _library.LOAD_ERROR,
        "cnnkernels_backend_env": os.environ.get("CNNKERNELS_BACKEND"),
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (inductor's own)"),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = props.total_memory
        env["cuda_runtime"] = torch.version.cuda
    try:
        env["cnnkernels_info"] = info.report()
    except Exception as error:  # the report is informative only
        env["cnnkernels_info"] = f"unavailable: {type(error).__name__}: {error}"
    return env
