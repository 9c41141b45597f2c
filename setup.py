"""Builds cnnkernels._C: the C++ sources always, the CUDA sources wherever nvcc and a
CUDA build of torch are present (no GPU is queried or needed).

Environment:
  CNNKERNELS_SKIP_CUDA_BUILD=1  build the C++ (CPU) part only
  TORCH_CUDA_ARCH_LIST          CUDA architectures (default "8.0;9.0")
  MAX_JOBS                      parallel compile jobs (read by torch's ninja builder)
"""
import glob
import os
import shutil
import subprocess

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    """The CUDA toolkit folder (holding bin/nvcc and lib64/libcudart.so). torch guesses it
    from nvcc's location, which is wrong when nvcc on PATH is a wrapper script; ask nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True).stderr
            candidates += [os.path.normpath(line.split("=", 1)[1].strip().strip('"'))
                           for line in dryrun.splitlines() if line.startswith("#$ TOP=")]
        except OSError:
            pass
    candidates += [cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(
                os.path.join(home, "lib*", "libcudart.so*")):
            return home
    return None


def _nvidia_wheel_includes() -> list[str]:
    """Headers such as cusparse.h that ship in torch's nvidia wheels (nvidia/cu13/include)."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "include")))


def _cuda_build_wanted() -> tuple[bool, str]:
    if os.environ.get("CNNKERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return False, "CNNKERNELS_SKIP_CUDA_BUILD=1"
    import torch

    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    home = _find_cuda_home()
    if home is None:
        return False, "no CUDA toolkit with nvcc and libcudart found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = home
    return True, f"nvcc in {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _extension():
    with_cuda, why = _cuda_build_wanted()
    print(f"cnnkernels: CUDA sources {'included' if with_cuda else 'skipped'} ({why})")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "cnnkernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += _nvidia_wheel_includes()
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "cnnkernels._C", sources, include_dirs=include_dirs,
        define_macros=define_macros + [("CNNKERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DCNNKERNELS_WITH_CUDA"], "nvcc": nvcc + ["-DCNNKERNELS_WITH_CUDA"]},
        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
