"""On a CUDA device: every GPU backend of conv_bn_act against cuDNN + torch BatchNorm.
Skipped where no GPU is present; written to run unchanged where one is."""
import pytest
import torch

import cnnkernels
from cnnkernels import ops
from helpers import CASES, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_matches_cudnn(backend, case, dtype, tol, training):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = [None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)
              for t in case.make(dtype)]
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = inputs
    with cnnkernels.use_backend(backend):
        out = ops.conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean.clone(), running_var.clone(),
                              training=training, residual=residual, **case.kwargs())
    y = torch.nn.functional.conv2d(x, weight, bias, case.stride, case.padding, case.dilation, case.groups)
    z = torch.nn.functional.batch_norm(y, running_mean.clone(), running_var.clone(), bn_weight, bn_bias,
                                       training, 0.1, 1e-5)
    z = z + residual if residual is not None else z
    ref = torch.relu(z) if case.activation == "relu" else z
    assert rel_err(out, ref) < tol
    grad = torch.randn_like(ref)
    leaves = [t for t in (x, weight, bn_weight, bn_bias, residual) if t is not None]
    for g, r in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert rel_err(g, r) < tol
