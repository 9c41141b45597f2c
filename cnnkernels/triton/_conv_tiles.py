"""Tile tables of the two general Triton convolution kernels (conv_bn_act's epilogue
kernel and bn_act_conv's prologue kernel): block sizes, warps and stages per layer shape.
tests/triton/test_conv_bn_act_aot.py and test_bn_act_conv_aot.py compile every entry for
sm_80 and sm_90 in every alignment the launchers reach.

Shared shape of both tables:
  direct  C_in/groups <= 4: multiply-adds on 256 x 16 (C_out <= 16) or 64 x 64 tiles;
  narrow  C_in/groups <= 16 or C_out/groups <= 16: 16 x 16 dot tiles;
  wide    per kernel (below);
  dot BLOCK_M is 128 on tensor cores (16-bit, or float32 with a tf32 precision), else 64.
Triton before 3.8 gets 8 warps for two more entries (see _support.TRITON_BEFORE_3_8).
Unaligned launches (an operand not channels-last with 16-divisible strides: NCHW
outputs, channel counts that are not multiples of 16) address every element on its own
and need smaller tiles to stay within registers: direct 16 x 32, dot 64 x min(N, 32) x 16.
"""
from __future__ import annotations

import torch

from cnnkernels.triton._support import TRITON_BEFORE_3_8

DIRECT_MAX_CIN_G = 4  # up to this many input channels per group: multiply-adds, not tl.dot


def _common(dtype: torch.dtype, cin_g: int, cout_g: int, c_out: int, precision: str, aligned: bool) -> dict | None:
    """The entries both tables share (direct, unaligned, narrow), or None for a wide dot tile."""
    dot_precision = precision if dtype == torch.float32 else "ieee"
    if cin_g <= DIRECT_MAX_CIN_G:  # no tl.dot: PRECISION is unused
        narrow = c_out <= 16
        block_m, block_n = (16, 32) if not aligned else (256, 16) if narrow else (64, 64)
        return dict(DIRECT=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, PRECISION="ieee",
                    num_warps=4, num_stages=2)
    if not aligned:
        return dict(DIRECT=False, BLOCK_M=64, BLOCK_N=16 if (cin_g <= 16 or cout_g <= 16) else 32, BLOCK_K=16,
                    PRECISION=dot_precision, num_warps=4, num_stages=2)
    if cin_g <= 16 or cout_g <= 16:
        tensor_cores = dtype != torch.float32 or precision != "ieee"
        return dict(DIRECT=False, BLOCK_M=128 if tensor_cores else 64, BLOCK_N=16, BLOCK_K=16,
                    PRECISION=dot_precision, num_warps=4, num_stages=3 if tensor_cores else 2)
    return None


def _dot(dtype, precision, block_n: int, block_k: int, num_warps: int) -> dict:
    tensor_cores = dtype != torch.float32 or precision != "ieee"
    return dict(DIRECT=False, BLOCK_M=128 if tensor_cores else 64, BLOCK_N=block_n, BLOCK_K=block_k,
                PRECISION=precision if dtype == torch.float32 else "ieee", num_warps=num_warps,
                num_stages=3 if tensor_cores else 2)


def conv_bn_act_config(dtype: torch.dtype, cin_g: int, cout_g: int, c_out: int, precision: str,
                       aligned: bool = True) -> dict:
    """conv_bn_act's _conv_fwd_kernel. Wide: BLOCK_N 64 (C_out/groups <= 64) or 128
    (tensor cores only, 8 warps), BLOCK_K 64 (16-bit) or 32 (float32); with triton < 3.8
    the 16-bit 64-column tile runs on 8 warps too."""
    common = _common(dtype, cin_g, cout_g, c_out, precision, aligned)
    if common is not None:
        return common
    tensor_cores = dtype != torch.float32 or precision != "ieee"
    block_n = (64 if cout_g <= 64 else 128) if tensor_cores else 64
    block_k = 32 if dtype == torch.float32 else 64
    # triton < 3.8: the 16-bit 128 x 64 x 64 tile spills on sm_80 with 4 warps (_support.TRITON_BEFORE_3_8)
    wide = block_n == 128 or (TRITON_BEFORE_3_8 and block_k == 64)
    return _dot(dtype, precision, block_n, block_k, 8 if wide else 4)


def bn_act_conv_config(dtype: torch.dtype, cin_g: int, cout_g: int, c_out: int, precision: str,
                       aligned: bool = True) -> dict:
    """bn_act_conv's _conv_fwd_kernel. Wide: BLOCK_N 32 (DenseNet's growth rate,
    C_out/groups <= 32), 64, or 128 (tensor cores only), BLOCK_K 64 (16-bit), 32
    (float32) or 16 (float32 "ieee" with 32 columns); 8 warps for 128 columns, for 16-bit
    64 x 64 and float32 "ieee" 64 x 32 (N x K) tiles (the prologue keeps the A tile in
    registers: 4 warps would spill on sm_80); with triton < 3.8 also the aligned 64 x 64
    direct tile."""
    common = _common(dtype, cin_g, cout_g, c_out, precision, aligned)
    if common is not None:
        if TRITON_BEFORE_3_8 and common["DIRECT"] and common["BLOCK_N"] == 64:
            common["num_warps"] = 8  # the prologue's 64 x 64 direct tile spills on sm_80 with 4
        return common
    tensor_cores = dtype != torch.float32 or precision != "ieee"
    if cout_g <= 32:
        block_n, block_k = 32, (64 if dtype != torch.float32 else 32 if tensor_cores else 16)
    else:
        block_n = (64 if cout_g <= 64 else 128) if tensor_cores else 64
        block_k = 32 if dtype == torch.float32 else 64
    big = block_n == 128 or block_n * block_k >= (4096 if tensor_cores else 2048)
    return _dot(dtype, precision, block_n, block_k, 8 if big else 4)
