"""On a CUDA device: the specialised forward kernels of the cuda backend of conv_bn_act
(1x1 GEMM, grouped 3x3; csrc/common/conv_bn_act_kernel_choice.h) against cuDNN + torch
BatchNorm, in training and eval, with and without residual and ReLU, forward, running
statistics and every gradient. Each case first checks that explain() names the kernel
it means to test. Skipped where no GPU is present; written to run unchanged where one is."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from cnnkernels import ops
from cnnkernels.ops import _conv_bn_act_choice as choice
from helpers import ConvShape, rel_err

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case(ConvShape):
    """padding is kernel // 2 in every case (same-size 3x3, 1x1 without padding)."""
    dtype: torch.dtype = torch.float32
    expected: str = ""


def _case(name, n, c_in, c_out, hw, kernel, stride, groups, dtype, expected) -> Case:
    return Case(name, n=n, c_in=c_in, c_out=c_out, hw=hw, kernel=kernel, stride=stride, padding=kernel // 2,
                groups=groups, dtype=dtype, expected=expected)


CASES = [
    _case("1x1_bottleneck_f32", 4, 256, 64, 14, 1, 1, 1, torch.float32, choice.CONV1X1_GEMM),
    _case("1x1_s2_odd_f64", 2, 37, 70, 9, 1, 2, 1, torch.float64, choice.CONV1X1_GEMM),
    _case("1x1_tiny_f32", 3, 5, 9, 7, 1, 1, 1, torch.float32, choice.CONV1X1_GEMM),
    _case("resnext_32x4d_f32", 2, 128, 128, 14, 3, 1, 32, torch.float32, choice.GROUPED_CONV3X3),
    _case("resnext_s2_bf16", 2, 256, 256, 15, 3, 2, 32, torch.bfloat16, choice.GROUPED_CONV3X3),
    _case("grouped_6_per_group_f16", 2, 24, 24, 9, 3, 1, 4, torch.float16, choice.GROUPED_CONV3X3),
    _case("grouped_32_per_group_f32", 2, 1024, 1024, 7, 3, 1, 32, torch.float32, choice.GROUPED_CONV3X3),
    _case("grouped_5_in_7_out_f64", 2, 10, 14, 17, 3, 2, 2, torch.float64, choice.GROUPED_CONV3X3),
]


@pytest.fixture(autouse=True)
def no_tf32():
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        yield


def _inputs(case: Case, with_residual: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64) * scale + offset

    x = rand(case.n, case.c_in, case.hw, case.hw).to(case.dtype).contiguous(memory_format=torch.channels_last)
    fan_in = case.c_in // case.groups * case.kernel ** 2
    weight = rand(case.c_out, case.c_in // case.groups, case.kernel, case.kernel, scale=fan_in ** -0.5).to(case.dtype)
    bias = rand(case.c_out, scale=0.1).to(case.dtype)
    bn_weight = rand(case.c_out, scale=0.3, offset=1.0).to(case.dtype)
    bn_bias = rand(case.c_out, scale=0.3).to(case.dtype)
    running_mean = rand(case.c_out, scale=0.2).to(case.dtype)
    running_var = (rand(case.c_out, scale=0.3).abs() + 0.5).to(case.dtype)
    h_out = case.out_hw()
    residual = rand(case.n, case.c_out, h_out, h_out).to(case.dtype).contiguous(memory_format=torch.channels_last) \
        if with_residual else None
    for t in (x, weight, bias, bn_weight, bn_bias, residual):
        if t is not None:
            t.requires_grad_(True)
    return x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual,activation", [(True, "relu"), (False, "none"), (False, "relu")],
                         ids=["residual-relu", "plain", "relu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_specialised_kernel_matches_cudnn(case, with_residual, activation, training):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = _inputs(case, with_residual)
    kwargs = dict(stride=case.stride, padding=case.padding, groups=case.groups, training=training,
                  residual=residual, activation=activation)
    with cnnkernels.use_backend("cuda"):
        verdict = ops.explain("conv_bn_act", x, weight, bias, bn_weight, bn_bias, running_mean, running_var, **kwargs)
        assert verdict["backend"] == "cuda" and verdict["kernel"].startswith(case.expected + ":"), verdict
        ours_mean, ours_var = running_mean.clone(), running_var.clone()
        out = ops.conv_bn_act(x, weight, bias, bn_weight, bn_bias, ours_mean, ours_var, **kwargs)
    assert out.is_contiguous(memory_format=torch.channels_last)

    ref_mean, ref_var = running_mean.clone(), running_var.clone()
    y = F.conv2d(x, weight, bias, case.stride, case.padding, 1, case.groups)
    z = F.batch_norm(y, ref_mean, ref_var, bn_weight, bn_bias, training, 0.1, 1e-5)
    z = z + residual if residual is not None else z
    ref = torch.relu(z) if activation == "relu" else z

    tol = TOLERANCE[case.dtype]
    assert rel_err(out, ref) < tol
    assert rel_err(ours_mean, ref_mean) < tol and rel_err(ours_var, ref_var) < tol
    grad = torch.randn_like(ref)
    leaves = [t for t in (x, weight, bias, bn_weight, bn_bias, residual) if t is not None]
    for ours, theirs in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert rel_err(ours, theirs) < tol


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.name)
def test_training_statistics_large_mean_offset(case):
    """A conv bias of 1e3 (|mean| / std ~ 1e3): the tile statistics keep the batch variance."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, _ = _inputs(case, False)
    bias = (bias.detach() + 1000).requires_grad_(True)
    with cnnkernels.use_backend("cuda"):
        _, conv_out, save_mean, save_var = torch.ops.cnnkernels.conv_bn_act(
            x, weight, bias, bn_weight, bn_bias, None, None, [case.stride] * 2, [case.padding] * 2, [1, 1],
            case.groups, True, 1e-5, None, "relu")
    ref_var, ref_mean = torch.var_mean(conv_out.double(), dim=(0, 2, 3), unbiased=False)
    assert rel_err(save_mean, ref_mean) < 1e-6
    assert rel_err(save_var, ref_var) < 1e-4
    assert rel_err(conv_out, F.conv2d(x, weight, bias, case.stride, case.padding, 1, case.groups)) < 1e-5
