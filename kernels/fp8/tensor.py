"""The FP8 operand format shared by every quantising kernel and FP8 GEMM.

A quantised operand is e4m3 data plus fp32 *decoding* scales (x ~= data.float() * scale, with
scale = amax / 448 of the scaled group, as linghe and Ling-2.0 use). `data` is always row-major
[rows, K] with K the GEMM's contraction dim, so `fp8_gemm(a, b)` computes a @ b^T for any recipe.

Scalings (scale shape for data [R, K]; `ceil` rounds partial blocks up):
  block1x128    [R, ceil(K/128)]        activations and gradients (1x128 tiles along K)
  block128x128  [ceil(R/128), ceil(K/128)] weights
  row           [R, 1]                  one scale per row (rowwise recipe)
  tensor        []                      one scale (tensorwise recipe)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
SCALINGS = ("block1x128", "block128x128", "row", "tensor")
# Smallest amax a scale is derived from: all-zero groups quantise to zeros, not NaN.
AMAX_FLOOR = 1e-12


@dataclass
class Fp8Tensor:
    data: Tensor  # float8_e4m3fn [R, K], row-major
    scale: Tensor  # fp32, shape by `scaling` (module docstring)
    scaling: str

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def num_blocks(n: int) -> int:
    """Blocks of BLOCK along a dim of size n (a partial last block counts)."""
    return -(-n // BLOCK)


def scale_shape(scaling: str, rows: int, cols: int) -> tuple[int, ...]:
    """The scale shape of `scaling` for data [rows, cols] (module docstring)."""
    return {"block1x128": (rows, num_blocks(cols)),
            "block128x128": (num_blocks(rows), num_blocks(cols)),
            "row": (rows, 1), "tensor": ()}[scaling]


def empty_scale(scaling: str, rows: int, cols: int, device) -> Tensor:
    """Uninitialised fp32 scales for data [rows, cols] in the layout every producer writes:
    block1x128 scales K-block-major (shape [rows, nb], strides (1, rows): the layout cuBLAS's
    blockwise GEMM reads without a copy); every other scaling contiguous."""
    if scaling == "block1x128":
        return torch.empty(num_blocks(cols), rows, dtype=torch.float32, device=device).t()
    return torch.empty(scale_shape(scaling, rows, cols), dtype=torch.float32, device=device)
