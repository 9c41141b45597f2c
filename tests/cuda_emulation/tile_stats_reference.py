"""Float64 ground truth shared by the emulation tests of the specialised conv_bn_act
kernels (test_conv1x1_bn_act_kernels.py, test_grouped_conv_bn_act_kernels.py): the BN
epilogues and the per-tile statistics those kernels store for training, and the eval
cases and training buffers both files use."""
from __future__ import annotations

import ctypes

import pytest
import torch

import emulation_build

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


# (with_residual, relu): every shape and dtype takes the first two, one shape the other two.
EPILOGUES = {"residual-relu": (True, True), "plain": (False, False)}
MIXED_EPILOGUES = {"residual-none": (True, False), "relu-only": (False, True)}


def eval_cases(shapes: list, shape_ids: list[str]) -> list:
    """pytest params (shape, with_residual, relu, dtype) of the eval tests: every shape and
    dtype with EPILOGUES, shapes[1] in float32 with MIXED_EPILOGUES."""
    cases = [pytest.param(shape, *epilogue, dtype, id=f"{shape_id}-{epilogue_id}-{dtype_id}")
             for shape, shape_id in zip(shapes, shape_ids)
             for epilogue_id, epilogue in EPILOGUES.items()
             for dtype, dtype_id in zip(DTYPES, DTYPE_IDS)]
    return cases + [pytest.param(shapes[1], *epilogue, torch.float32, id=f"{shape_ids[1]}-{epilogue_id}-f32")
                    for epilogue_id, epilogue in MIXED_EPILOGUES.items()]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64, after checking that every element was written."""
    assert not out.isnan().any(), "some elements were never written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-12


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))  # keeps t's memory format


def training_buffers(c_out: int, tiles: int, dtype: torch.dtype) -> tuple:
    """NaN-filled (partial_mean [C, P], partial_m2 [C, P]) and mean, var [C], partial_count [P] of -1s:
    (partial_mean, partial_m2, partial_count, mean, var) as the kernels take them."""
    partial_mean = torch.full((c_out, tiles), float("nan"), dtype=dtype)
    partial_m2 = torch.full((c_out, tiles), float("nan"), dtype=dtype)
    partial_count = torch.full((tiles,), -1, dtype=torch.int32)
    mean = torch.full((c_out,), float("nan"), dtype=dtype)
    var = torch.full((c_out,), float("nan"), dtype=dtype)
    return partial_mean, partial_m2, partial_count, mean, var


def eval_reference(conv: torch.Tensor, scale, shift, residual, relu: bool) -> torch.Tensor:
    """act(conv * scale[c] + shift[c] + residual) in float64, conv [N, C, H, W]."""
    out = conv.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.double()
    return out.relu() if relu else out


def tile_stats(y: torch.Tensor, tile_of_pixel: torch.Tensor, tiles: int):
    """Per-tile (mean [C, P], M2 [C, P], count [P]) of y [N, C, H, W] in float64, pixel
    (n, h, w) belonging to tile tile_of_pixel[n, h, w]."""
    rows = y.double().permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    index = tile_of_pixel.reshape(-1)
    count = torch.bincount(index, minlength=tiles)
    total = torch.zeros(tiles, y.shape[1], dtype=torch.float64).index_add_(0, index, rows)
    mean = total / count.clamp_min(1).unsqueeze(1)
    m2 = torch.zeros_like(total).index_add_(0, index, (rows - mean[index]) ** 2)
    return mean.t(), m2.t(), count


def check_training(y, partial_mean, partial_m2, partial_count, mean, var, tile_of_pixel, tiles, dtype):
    """The stored partials and the merged statistics against those of the stored y."""
    ref_mean, ref_m2, ref_count = tile_stats(y, tile_of_pixel, tiles)
    assert torch.equal(partial_count.long(), ref_count)
    assert rel(partial_mean, ref_mean) < tol(dtype)
    assert rel(partial_m2, ref_m2) < tol(dtype)
    ref_var, ref_mean_all = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    assert rel(mean, ref_mean_all) < tol(dtype)
    assert rel(var, ref_var) < tol(dtype)


def run(lib, name: str, dtype: torch.dtype, *args) -> None:
    emulation_build.call(lib, name, dtype, *args)
