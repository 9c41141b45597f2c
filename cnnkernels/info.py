"""`python -m cnnkernels.info`: versions, how cnnkernels._C was built, and for every op
which backends can run it on this machine and why the others cannot."""
from __future__ import annotations

import platform

import torch

import cnnkernels
from cnnkernels import _backends, _library


def _triton_version() -> str:
    try:
        import triton
    except ImportError as error:
        return f"not installed ({error})"
    return triton.__version__


def _sample_inputs(device: str) -> dict[str, tuple]:
    """The schema arguments of one small float32 call of every public op (each op file
    declares its sample call), to ask each backend whether it can run it here."""
    from cnnkernels.ops import _registration

    return {name: call.normalize(*args, **kwargs) for name, call in _registration.PUBLIC_CALLS.items()
            for args, kwargs in [call.sample(device)]}


def _kernel_choices() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """{(op, backend): [(kernel, when it runs)]} for the backends that pick a kernel by shape."""
    from cnnkernels.ops import _conv_bn_act_choice
    from cnnkernels.triton import conv_bn_act as triton_conv_bn_act

    return {("conv_bn_act", "triton"): list(triton_conv_bn_act.KERNEL_CHOICES),
            ("conv_bn_act", "cuda"): list(_conv_bn_act_choice.CUDA_KERNEL_CHOICES),
            ("conv_bn_act", "cpu"): list(_conv_bn_act_choice.CPU_KERNEL_CHOICES)}


def report() -> str:
    lines = [
        f"cnnkernels {cnnkernels.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}",
        f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}; "
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
    ]
    if _library.extension_loaded():
        lines.append(f"cnnkernels._C: loaded, built {'with' if _library.built_with_cuda() else 'without'} CUDA")
    else:
        lines.append(f"cnnkernels._C: NOT loaded ({_library.LOAD_ERROR})")
    forced = _backends.forced_backend()
    lines.append(f"forced backend: {forced or 'none (default order)'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for op_name, args in _sample_inputs(device).items():
            lines.append(f"\n{op_name} on {device} float32 tensors:")
            verdict = _backends.explain(op_name, args)
            lines.append(f"  runs: {verdict['backend']} ({verdict['kernel']})")
            for backend in _backends.BACKENDS:
                reasons = _backends.reasons_for(op_name, backend, args)
                if reasons:
                    status = "cannot: " + "; ".join(reasons)
                elif backend in _backends.DEFAULT_ORDER.get(device, ()):
                    status = "can run"
                else:
                    status = f"can run when forced (not in the default order for {device} tensors)"
                lines.append(f"  {backend:<10} {status}")
    lines.append("\nkernels picked by shape (first match wins):")
    for (op_name, backend), choices in _kernel_choices().items():
        lines.append(f"  {op_name} on {backend}:")
        lines += [f"    {kernel}: {rule}" for kernel, rule in choices]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
