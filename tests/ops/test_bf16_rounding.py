"""The CPU kernels' bfloat16 conversions (csrc/cpu/simd_cast.h) are bit for bit torch's:
widening exact, narrowing round-to-nearest-even with ties, overflow to inf, subnormals,
and NaN as c10's scalar conversion writes it. Checked through se_excite's output pass, whose gate is
exactly 0.5 here (fc2 all zero), so out = relu(x * 0.5 + residual) rounded once."""
import pytest
import torch

import cnnkernels  # noqa: F401  (registers the ops)
from cnnkernels import _library

pytestmark = pytest.mark.skipif(not _library.has_native_kernel("_se_excite_forward_native", "CPU"),
                                reason="the compiled CPU kernels are not built")


def special_residuals(n):
    one_ulp = 2.0 ** -7  # bfloat16 spacing in [1, 2)
    values = [1.0, 1.0 + one_ulp, -1.0 - one_ulp, 3.0e38, -3.0e38, 1e-39, -1e-39, 0.0, -0.0,
              float("inf"), float("-inf"), float("nan"), 2.0 ** 100, 7.0, -2.5]
    return torch.tensor((values * n)[:n])


def test_se_excite_output_rounding_is_torchs_bit_for_bit():
    torch.manual_seed(0)
    n, c, h, w = 2, 16, 5, 7
    count = n * c * h * w
    # x * 0.5 lands exactly half a bfloat16 step above the residual where x = 2 ** -7
    # and the residual is in [1, 2): a tie, rounded to even; elsewhere random values.
    x = torch.randn(count)
    x[::3] = 2.0 ** -7
    x[1::7] = 3.0e38
    residual = torch.randn(count) * 4
    residual[::3] = special_residuals(len(residual[::3]))
    x = x.to(torch.bfloat16).view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last
    residual = residual.to(torch.bfloat16).view(n, h, w, c).permute(0, 3, 1, 2)
    w1 = torch.randn(4, c).to(torch.bfloat16)
    w2 = torch.zeros(c, 4, dtype=torch.bfloat16)
    for activation in ("relu", "none"):
        out, _, _, gate = torch.ops.cnnkernels._se_excite_forward_native(x, w1, None, w2, None, residual,
                                                                          activation)
        assert torch.all(gate == 0.5)
        want = x.float() * 0.5 + residual.float()
        if activation == "relu":
            want = torch.where(want < 0, torch.zeros_like(want), want)  # NaN stays NaN, as in the kernel
        want = want.to(torch.bfloat16)
        nan = want.isnan()
        assert nan.sum() > 0 and torch.equal(out.isnan(), nan)
        # c10's scalar conversion writes every NaN as 0x7FC0 (torch's vectorised one may keep its sign).
        assert torch.all(out[nan].view(torch.int16) == 0x7FC0)
        assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16)), activation
        ties = (x == 2.0 ** -7) & (residual.float().abs() >= 1) & (residual.float().abs() < 2)
        assert ties.sum() > 10
