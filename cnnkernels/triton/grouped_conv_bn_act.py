"""Triton conv_bn_act forward for ResNeXt-style grouped convolutions: 4 to 32 channels per
group (as many in as out), 3x3, stride 1 or 2, padding 1 (cardinality 32 in ResNeXt).

A per-group GEMM would be [pixels, 9 * C_in/g] x [9 * C_in/g, C_out/g]: a handful of
columns, far below a tensor-core tile. Instead each program takes G consecutive groups
at once. Their input channels are one contiguous run of G*C_in/g channels (the
reduction lanes of the tile, padded to BLOCK_K), their output channels one run of
G*C_out/g (the columns, padded to BLOCK_N), and the weight of one tap is the
block-diagonal [BLOCK_K, BLOCK_N] matrix

    B[j*C_in/g + ci, j*C_out/g + co] = w[(first group + j)*C_out/g + co, ci, tap],
    zero wherever the input and output channel belong to different groups,

so one tl.dot of [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] per tap computes all G groups.
pack_weight builds these tiles on the host (G times the weight's size, zeros included),
so the kernel reads each tap's B as a dense, unmasked tile, and reads x (channels-last:
contiguous channel runs) and writes out exactly like a plain GEMM. The zero blocks cost
G x the useful multiply-adds, which tensor cores absorb (16-bit input, or float32 with
a tf32 FP32_DOT_PRECISION); with float32 "ieee" dots they are real FMAs (G <= 8).
The BN / residual / activation (eval) or conv_out + partial statistics (training)
epilogue is cnnkernels/triton/_conv_epilogue.py's. x is read through its strides (no
copy). Accumulation is float32 (float64 in the interpreter).
"""
from __future__ import annotations

import torch

from cnnkernels.triton import _support
from cnnkernels.triton._conv_epilogue import conv_bn_act_epilogue
from cnnkernels.triton._support import kernel, tl, triton

NAME = "triton grouped conv"
RULE = ("3x3 kernel, stride 1 or 2, padding 1, dilation 1, 4 to 32 channels per group (as many in as out), "
        "groups >= G (G = 8, 4, 2, 2 groups per tile for up to 4, 8, 16, 32 channels per group)")
_MIN_CHANNELS, _MAX_CHANNELS = 4, 32


@kernel
def _grouped_conv_fwd_kernel(
    x_ptr, wp_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
    M, H, W, H_OUT, W_OUT, GROUPS, GROUPS_PER_TILE, CIN_G, COUT_G, C_OUT, KH, KW,
    stride_h, stride_w, pad_h, pad_w,
    sx_n, sx_c, sx_h, sx_w,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    TRAINING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """x [N, C_in, H, W] (any strides); wp [tiles, KH*KW, BLOCK_K, BLOCK_N] from
    pack_weight; grid (cdiv(M, BLOCK_M), cdiv(groups, GROUPS_PER_TILE)), GROUPS_PER_TILE
    * CIN_G <= BLOCK_K and GROUPS_PER_TILE * COUT_G <= BLOCK_N. Outputs as
    conv_bn_act_epilogue describes, for the channels of this tile's groups."""
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    first_group = tile * GROUPS_PER_TILE
    groups_here = tl.minimum(GROUPS - first_group, GROUPS_PER_TILE)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n = (rows // (H_OUT * W_OUT)).to(tl.int64)
    oh = (rows % (H_OUT * W_OUT)) // W_OUT
    ow = rows % W_OUT
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < groups_here * CIN_G
    x_chan = (first_group * CIN_G + ks) * sx_c
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < groups_here * COUT_G
    co = first_group * COUT_G + cols
    w_tile = wp_ptr + tile.to(tl.int64) * (KH * KW * BLOCK_K * BLOCK_N) + (ks[:, None] * BLOCK_N + cols[None, :])
    x_rows = x_ptr + n * sx_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for tap in range(0, KH * KW):
        ih = oh * stride_h - pad_h + tap // KW
        iw = ow * stride_w - pad_w + tap % KW
        in_mask = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load((x_rows + (ih * sx_h + iw * sx_w))[:, None] + x_chan[None, :],
                    mask=in_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_tile + tap * (BLOCK_K * BLOCK_N))
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    conv_bn_act_epilogue(
        acc, pid_m, co, row_mask, col_mask, n * so_n + oh * so_h + ow * so_w, so_c,
        n * sr_n + oh * sr_h + ow * sr_w, sr_c,
        M, C_OUT, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr,
        TRAINING, HAS_BIAS, HAS_RESIDUAL, RELU, ACC_DTYPE, BLOCK_M)


def _next_power_of_2(value: int) -> int:
    return 1 << (value - 1).bit_length()


def groups_per_tile(channels_per_group: int) -> int:
    """G: 8, 4, 2, 2 for up to 4, 8, 16, 32 channels per group, so that the tile is 32
    lanes wide (64 above 16 channels per group, where 2 groups are the fewest worth
    packing): 32 gives a 16-bit mma two k-steps per tap, and G <= 8 bounds the zero
    blocks' extra work at 8x."""
    slot = _next_power_of_2(channels_per_group)
    return max(32, 2 * slot) // slot


def mismatch(weight_shape, stride, padding, dilation, groups) -> str | None:
    """Why this kernel does not take a convolution (None when it does); see RULE."""
    c_out, cin_g, kh, kw = weight_shape
    if groups == 1:
        return "groups=1"
    cout_g = c_out // groups
    if cin_g != cout_g:
        return f"{cin_g} -> {cout_g} channels per group differ"
    if not _MIN_CHANNELS <= cin_g <= _MAX_CHANNELS:
        return f"{cin_g} channels per group is outside {_MIN_CHANNELS}..{_MAX_CHANNELS}"
    if (kh, kw) != (3, 3):
        return f"kernel {kh}x{kw} is not 3x3"
    if any(s not in (1, 2) for s in stride) or any(p != 1 for p in padding) or any(d != 1 for d in dilation):
        return (f"stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)} is not "
                "stride 1 or 2, padding 1, dilation 1")
    per_tile = groups_per_tile(cin_g)
    if groups < per_tile:
        return f"groups={groups} is fewer than the {per_tile} groups of one tile"
    return None


def config(dtype: torch.dtype, channels_per_group: int, precision: str, vector: bool) -> dict:
    """The fixed configuration, no autotuning. G from groups_per_tile(); the tile width
    BLOCK_K = BLOCK_N = G x channels per group rounded up to a power of two (32, or 64
    above 16 channels per group). Rows and warps:
      tensor cores (16-bit input, or float32 with a tf32 precision), vector access
        (aligned channels-last tensors, conv_bn_act._vector_io): BLOCK_M 128, 8 warps;
      tensor cores, scalar access (anything else: every element its own address):
        BLOCK_M 64, 8 warps;
      float32 "ieee" (FMA dots, whose operands sit whole in registers): BLOCK_M 32, 8 warps.
    3 pipeline stages over the 9 taps on tensor cores (2 for tf32 with triton < 3.8,
    see _support.TRITON_BEFORE_3_8), 2 for "ieee". Each was picked
    among a few candidates as the widest that spills no registers on sm_80 and sm_90
    in its worst case (ptxas -v; tests/triton/test_grouped_conv_bn_act_aot.py compiles
    every configuration this can return)."""
    per_tile = groups_per_tile(channels_per_group)
    width = _next_power_of_2(per_tile * channels_per_group)
    tensor_cores = dtype != torch.float32 or precision != "ieee"
    if tensor_cores:
        block_m, stages = (128 if vector else 64), 3
        if _support.TRITON_BEFORE_3_8 and dtype == torch.float32:
            stages = 2  # triton < 3.8: the tf32 128-row tile spills on sm_80 with 3 stages
    else:
        block_m, stages = 32, 2
    return dict(BLOCK_M=block_m, BLOCK_K=width, BLOCK_N=width, GROUPS_PER_TILE=per_tile,
                PRECISION=precision if dtype == torch.float32 else "ieee", num_warps=8, num_stages=stages)


def describe(dtype: torch.dtype, channels_per_group: int, precision: str, vector: bool) -> str:
    """The packing and tiles config() picks, in words."""
    cfg = config(dtype, channels_per_group, precision, vector)
    return (f"{cfg['GROUPS_PER_TILE']} groups of {channels_per_group} channels per tile: one [{cfg['BLOCK_M']}, "
            f"{cfg['BLOCK_K']}] x [{cfg['BLOCK_K']}, {cfg['BLOCK_N']}] block-diagonal tl.dot per tap, "
            f"{cfg['num_warps']} warps")


def pack_weight(weight: torch.Tensor, groups: int, per_tile: int, block_k: int, block_n: int) -> torch.Tensor:
    """weight [C_out, C_in/groups, KH, KW] -> [cdiv(groups, G), KH*KW, BLOCK_K, BLOCK_N]
    contiguous, tile t's tap matrix being block-diagonal over groups t*G .. t*G+G-1 (see
    the module docstring); zero in the padding lanes and past the last group."""
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    tiles = -(-groups // per_tile)
    device = weight.device
    k = torch.arange(block_k, device=device)
    cols = torch.arange(block_n, device=device)
    tile = torch.arange(tiles, device=device)[:, None, None]
    k_group, n_group = (k // cin_g)[:, None], (cols // cout_g)[None, :]
    valid = (k_group == n_group) & (k_group < per_tile) & (tile * per_tile + k_group < groups)  # [T, K, N]
    co = (tile * per_tile * cout_g + cols[None, None, :]).clamp(max=c_out - 1)
    ci = (k % cin_g)[None, :, None]
    taps = weight.reshape(c_out, cin_g, kh * kw)[co, ci]  # [T, K, N, taps]
    return torch.where(valid[..., None], taps, 0).permute(0, 3, 1, 2).contiguous()


def launch(x, weight, bias, scale, shift, residual, out, psum, pm2, stride, padding, groups, cfg, acc_dtype,
           training, activation):
    """Runs _grouped_conv_fwd_kernel with config cfg (from config()) into out [N, C_out,
    H_out, W_out] (any strides); psum / pm2 [cdiv(M, cfg BLOCK_M), C_out] in training."""
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    per_tile = cfg.pop("GROUPS_PER_TILE")
    c_out, cin_g, kh, kw = weight.shape
    packed = pack_weight(weight, groups, per_tile, cfg["BLOCK_K"], cfg["BLOCK_N"])
    n, _, h_out, w_out = out.shape
    m = n * h_out * w_out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), packed.shape[0])
    dummy = out
    _grouped_conv_fwd_kernel[grid](
        x, packed, bias if bias is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, residual if residual is not None else dummy, out,
        psum if psum is not None else dummy, pm2 if pm2 is not None else dummy,
        m, x.shape[2], x.shape[3], h_out, w_out, groups, per_tile, cin_g, c_out // groups, c_out, kh, kw,
        stride[0], stride[1], padding[0], padding[1],
        *x.stride(), *(residual.stride() if residual is not None else (0, 0, 0, 0)), *out.stride(),
        TRAINING=training, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=activation == "relu", ACC_DTYPE=acc_dtype, **cfg, num_warps=num_warps, num_stages=num_stages)
