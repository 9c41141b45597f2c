"""cnnkernels: fused convolution kernels (reference, C++ CPU, Triton, CUDA backends) for
classic convolutional networks, as registered torch ops with autograd and fake tensors.

    import cnnkernels
    y = cnnkernels.ops.conv_bn_act(x, w, bn_weight=g, bn_bias=b, running_mean=m, running_var=v)
    with cnnkernels.use_backend("reference"): ...

`python -m cnnkernels.info` tells which backends can run each op on this machine.
"""
from cnnkernels import _library  # loads _C (or warns once and defines the schemas)
from cnnkernels._backends import BACKENDS, BackendError, use_backend
from cnnkernels import ops, nn

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendError", "use_backend", "ops", "nn", "__version__"]
