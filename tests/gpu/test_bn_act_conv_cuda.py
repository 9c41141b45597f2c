"""On a CUDA device: the cuda backend of bn_act_conv (csrc/cuda/bn_act_conv.cu) against
plain torch on the same GPU: F.batch_norm -> activation -> F.conv2d in float64 (cuDNN)
as the ground truth; float32 and bfloat16, train and eval, every gradient, running
statistics, x as a channel-prefix view, and the into form writing a channel slice of a
NaN-filled buffer. Skipped where no GPU is present; written to run unchanged where one is.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import ops
from helpers import ConvShape, rel_err

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case(ConvShape):
    c_in: int = 12
    hw: int = 9
    bias: bool = False
    activation: str = "relu"

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


CASES = [
    Case("1x1", kernel=1, padding=0, c_out=48),
    Case("3x3"),
    Case("3x3_wide", c_in=64, c_out=130, hw=14, bias=True),  # several tiles in both GEMM dimensions
    Case("stride2", stride=2, bias=True),
    Case("dilation2", padding=2, dilation=2, activation="none"),
    Case("groups2", groups=2),
    Case("depthwise", c_in=16, c_out=16, groups=16),
    Case("3to5", c_in=3, c_out=5, hw=7, bias=True, activation="none"),
    Case("batch1", n=1, hw=6),
]
LAYOUTS = ["nchw_prefix", "nhwc_prefix", "dense"]


def _x(case, dtype, layout, gen):
    """x [N, C_in, H, W] on the GPU: dense NCHW, or the prefix of a buffer with 8 more channels."""
    extra = 0 if layout == "dense" else 8
    buf = torch.randn(case.n, case.c_in + extra, case.hw, case.hw, generator=gen, dtype=torch.float64)
    buf = (buf * 1.5 + torch.randn(1, case.c_in + extra, 1, 1, generator=gen, dtype=torch.float64)).to("cuda", dtype)
    if layout == "nhwc_prefix":
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf[:, :case.c_in]


def _inputs(case, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to("cuda", dtype)

    x = _x(case, dtype, layout, gen)
    weight = rand(case.c_out, case.c_in // case.groups, case.kernel, case.kernel,
                  scale=(case.c_in // case.groups * case.kernel ** 2) ** -0.5)
    bias = rand(case.c_out, scale=0.1) if case.bias else None
    bn_weight = rand(case.c_in, scale=0.3, offset=1.0)
    bn_bias = rand(case.c_in, scale=0.3)
    running_mean = rand(case.c_in, scale=0.2)
    running_var = rand(case.c_in, scale=0.3).abs() + 0.5
    return x, weight, bias, bn_weight, bn_bias, running_mean, running_var


def _torch_forward(case, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training):
    z = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, 0.1, 1e-5)
    a = torch.relu(z) if case.activation == "relu" else z
    return F.conv2d(a, weight, bias, **case.kwargs())


def _leaves(inputs, dtype=None):
    """(x, weight, bias, bn_weight, bn_bias) as fresh leaves requiring grad (cast if dtype)."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs[:5]]


def _run(case, inputs, training, grad_out, backend):
    """out, running stats after the call, and the gradients of the five differentiable inputs."""
    leaves = _leaves(inputs)
    running_mean, running_var = inputs[5].clone(), inputs[6].clone()
    if backend is None:
        out = _torch_forward(case, *leaves, running_mean, running_var, training)
    else:
        with cnnkernels.use_backend(backend):
            out = ops.bn_act_conv(*leaves, running_mean, running_var, training=training,
                                  activation=case.activation, **case.kwargs())
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype))
    return out, running_mean, running_var, grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_backend_matches_torch(case, dtype, layout, training):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = _inputs(case, dtype, layout)
    grad_out = torch.randn(case.n, case.c_out, case.out_hw(), case.out_hw(), device="cuda", dtype=torch.float64,
                           generator=torch.Generator("cuda").manual_seed(1))
    ref_inputs = [None if t is None else t.double() for t in inputs]
    ref_out, ref_rm, ref_rv, ref_grads = _run(case, ref_inputs, training, grad_out, None)
    out, rm, rv, grads = _run(case, inputs, training, grad_out, "cuda")

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape and not out.isnan().any()
    channels_last = layout == "nhwc_prefix"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel_err(out, ref_out) < tol
    assert rel_err(rm, ref_rm) < tol and rel_err(rv, ref_rv) < tol
    if dtype == torch.bfloat16:  # gradients through bf16 tensors: no worse than twice torch's own bf16 error
        _, _, _, torch_grads = _run(case, inputs, training, grad_out, None)
        grad_tols = [max(tol, 2 * rel_err(g, r)) for g, r in zip(torch_grads, ref_grads)]
    else:
        grad_tols = [tol] * len(ref_grads)
    names = [n for n, t in zip(("x", "weight", "bias", "bn_weight", "bn_bias"), inputs) if t is not None]
    for name, g, r, gt in zip(names, grads, ref_grads, grad_tols):
        assert g.shape == r.shape and not g.isnan().any(), name
        if name == "x":
            assert g.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert rel_err(g, r) < gt, (name, rel_err(g, r), gt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("buffer_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[7]], ids=lambda c: c.name)
def test_into_writes_only_its_slice(case, dtype, buffer_format, training):
    """out = a channel slice of a NaN-filled buffer: it is written, the rest stays NaN, it is
    returned, and the running statistics are updated as in the functional form."""
    inputs = _inputs(case, dtype, "nhwc_prefix" if buffer_format == "nhwc" else "nchw_prefix", seed=3)
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = inputs
    hw = case.out_hw()
    buf = torch.full((case.n, case.c_out + 7, hw, hw), float("nan"), device="cuda", dtype=dtype)
    if buffer_format == "nhwc":
        buf = buf.contiguous(memory_format=torch.channels_last)
    out = buf[:, 3:3 + case.c_out]
    rm, rv = running_mean.clone(), running_var.clone()
    with torch.no_grad(), cnnkernels.use_backend("cuda"):
        result = ops.bn_act_conv(x, weight, bias, bn_weight, bn_bias, rm, rv, training=training,
                                 activation=case.activation, out=out, **case.kwargs())
    assert result is out
    ref_rm, ref_rv = running_mean.double(), running_var.double()
    ref = _torch_forward(case, *[None if t is None else t.double() for t in inputs[:5]], ref_rm, ref_rv, training)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(rm, ref_rm) < TOL[dtype] and rel_err(rv, ref_rv) < TOL[dtype]
    assert buf[:, :3].isnan().all() and buf[:, 3 + case.c_out:].isnan().all()


@pytest.mark.parametrize("buffer_format", ["nchw", "nhwc"])
def test_dense_block_layer_in_one_buffer(buffer_format):
    """DenseNet's concat-in-place: x = buf[:, :c] and out = buf[:, c:c+k] of ONE buffer."""
    gen = torch.Generator().manual_seed(4)
    n, c, k, hw = 2, 24, 12, 8
    buf = torch.randn(n, c + k, hw, hw, generator=gen).cuda()
    if buffer_format == "nhwc":
        buf = buf.contiguous(memory_format=torch.channels_last)
    buf[:, c:] = float("nan")
    x, out = buf[:, :c], buf[:, c:]
    weight = (torch.randn(k, c, 3, 3, generator=gen) * 0.1).cuda()
    bn_weight, bn_bias = (torch.rand(c, generator=gen) + 0.5).cuda(), torch.randn(c, generator=gen).cuda()
    running_mean, running_var = torch.randn(c, generator=gen).cuda(), (torch.rand(c, generator=gen) + 0.5).cuda()
    ref = _torch_forward(Case("dense", c_in=c, c_out=k), x.double(), weight.double(), None, bn_weight.double(),
                         bn_bias.double(), running_mean.double(), running_var.double(), False)
    before = x.clone()
    with torch.no_grad(), cnnkernels.use_backend("cuda"):
        ops.bn_act_conv(x, weight, None, bn_weight, bn_bias, running_mean, running_var, padding=1, out=out)
    assert rel_err(out, ref) < 1e-4
    assert torch.equal(x, before)


def test_native_results_and_output_mask():
    """The _native ops on CUDA: statistics dtype float32 for bf16 input, batch statistics in
    training, unwanted gradients as empty [0] tensors."""
    case = CASES[1]
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = _inputs(case, torch.bfloat16, "nhwc_prefix")
    native = torch.ops.cnnkernels
    out, save_mean, save_var = native._bn_act_conv_forward_native(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, "relu")
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert save_mean.dtype == save_var.dtype == torch.float32 and save_mean.shape == (case.c_in,)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert rel_err(save_mean, ref_mean) < 1e-5 and rel_err(save_var, ref_var) < 1e-5
    grad_out = torch.randn_like(out)
    grads = native._bn_act_conv_backward_native(
        grad_out, x, weight, bias, bn_weight, bn_bias, save_mean, save_var, [1, 1], [1, 1], [1, 1], 1, True, 1e-5,
        "relu", [False, False, False, True, True])
    assert [g.numel() for g in grads[:3]] == [0, 0, 0]
    assert grads[3].shape == grads[4].shape == (case.c_in,) and grads[3].dtype == torch.float32
