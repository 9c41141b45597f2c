"""Pinned from the property tests: a kernel 1 wide on an axis with dilation 2 there, on a
channels_last input with bias, groups and stride 2, crashes the process inside oneDNN's
brgemm convolution in torch 2.14 (`nn.Conv2d(9, 9, 1, 2, (0, 1), 2, 3)` on a [1, 9, 2, 1]
channels_last input: a segmentation fault). A 1-wide axis has no taps to space, so the ops
and the frozen CPU path run such convolutions with dilation 1 there. Each case runs in a
child process, so that a crash fails one test rather than the whole run."""
import subprocess
import sys
import textwrap

import pytest

CASES = [  # (x shape, weight shape, stride, padding, dilation, groups)
    ((1, 9, 2, 1), (9, 3, 1, 1), 2, (0, 1), 2, 3),
    ((2, 2, 6, 7), (2, 1, 1, 1), 2, 1, 2, 2),
    ((2, 2, 2, 7), (4, 2, 2, 1), 2, 1, (1, 2), 1),
]

CHILD = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    import cnnkernels
    from cnnkernels import ops

    x_shape, w_shape, stride, padding, dilation, groups = eval(sys.argv[1])
    plain_dilation = [1 if k == 1 else d for k, d in zip(w_shape[2:], (dilation,) * 2 if isinstance(dilation, int)
                                                         else dilation)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(w_shape[0], generator=gen, dtype=torch.float64)
    bn_over = {"conv_bn_act": w_shape[0], "bn_act_conv": x_shape[1]}
    for op, channels in bn_over.items():
        g, b = torch.rand(channels, dtype=torch.float64) + 0.5, torch.randn(channels, dtype=torch.float64)
        mean, var = torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5
        if op == "conv_bn_act":
            expected = F.batch_norm(F.conv2d(x, w, bias, stride, padding, plain_dilation, groups), mean, var, g, b)
        else:
            expected = F.conv2d(F.batch_norm(x, mean, var, g, b), w, bias, stride, padding, plain_dilation, groups)
        for backend in ("reference", "cpu"):
            for dtype in (torch.float32, torch.float64):
                leaves = [t.to(dtype, copy=True).requires_grad_() for t in (x, w, bias)]
                with cnnkernels.use_backend(backend):
                    out = getattr(ops, op)(*leaves, g.to(dtype), b.to(dtype), mean.to(dtype), var.to(dtype),
                                           stride=stride, padding=padding, dilation=dilation, groups=groups,
                                           activation="none")
                    out.sum().backward()
                err = ((out.double() - expected).norm() / expected.norm()).item()
                assert err < (1e-5 if dtype == torch.float32 else 1e-12), (op, backend, dtype, err)
                assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    conv = torch.nn.Conv2d(x_shape[1], w_shape[0], w_shape[2:], stride, padding, dilation, groups).eval()
    bn = torch.nn.BatchNorm2d(w_shape[0]).eval()
    model = cnnkernels.nn.freeze(torch.nn.Sequential(cnnkernels.nn.ConvBNAct.from_modules(conv, bn)))
    with torch.inference_mode():
        frozen = model(x.float())
    expected = bn(F.conv2d(x.float(), conv.weight, conv.bias, stride, padding, plain_dilation, groups)).relu()
    assert ((frozen - expected).norm() / expected.norm()).item() < 1e-5
    print("ok")
""")


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_runs_and_matches_the_undilated_convolution(case):
    result = subprocess.run([sys.executable, "-c", CHILD, repr(case)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
