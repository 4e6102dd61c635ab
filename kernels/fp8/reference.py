"""Plain PyTorch FP8 quantisers, dequantisation and the GEMM they define: the ground truth of every
FP8 kernel and the CPU path.

Every quantiser follows the operand format of `tensor.py`: per group, scale = max(amax, AMAX_FLOOR)
/ 448 (fp32, a decoding scale) and data = (x_fp32 * (1 / scale)).clamp(-448, 448) cast to e4m3
(round to nearest even; the kernels take the reciprocal once per group). Groups of a partial
block cover only the valid elements.

"Rows" quantisation of x [M, K] gives data [M, K]; "columns" quantisation gives the operand of x^T
(data [K, M], groups along M), i.e. the rows quantisation of x^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, Fp8Tensor, empty_scale, num_blocks


def scale_from_amax(amax: Tensor) -> Tensor:
    """The decoding scale of a group with absolute maximum `amax` (fp32), correctly rounded.

    The divisor is a tensor: CUDA torch divides by a Python scalar as a multiply by its
    reciprocal, 1 ulp off in ~10% of groups on the H100, which then flips the e4m3 rounding of
    the many bf16 values that land exactly on a tie (~0.1% of them)."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    return amax / torch.full_like(amax, FP8_MAX)


def cast_to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """e4m3 data of x under decoding scale `scale` (broadcast against x): x times the
    IEEE-rounded reciprocal of the scale, clamped, rounded to nearest even."""
    return (x.float() * scale.float().reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _expand(scale: Tensor, scaling: str, rows: int, cols: int) -> Tensor:
    """The per-element scale [rows, cols] (or a broadcastable view) of a group scale."""
    if scaling == "block1x128":
        return scale.repeat_interleave(BLOCK, dim=1)[:, :cols]
    if scaling == "block128x128":
        return scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:rows, :cols]
    return scale  # row [rows, 1] and tensor [] broadcast


def quantize_rows_reference(x: Tensor, scaling: str, amax: Tensor | None = None) -> Fp8Tensor:
    """x [R, K] (any float dtype) -> Fp8Tensor, data [R, K], under any of the four scalings.
    amax (tensor scaling only): the amax the scale is taken from instead of x's own (delayed
    scaling: amax_history.py)."""
    if amax is not None and scaling != "tensor":
        raise ValueError(f"a given amax needs tensor scaling, got {scaling!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [R, K], got {tuple(x.shape)}")
    R, K = x.shape
    a = x.float().abs()
    if scaling == "block1x128":
        nb = num_blocks(K)
        amax = F.pad(a, (0, nb * BLOCK - K)).view(R, nb, BLOCK).amax(dim=2)
    elif scaling == "block128x128":
        nr, nk = num_blocks(R), num_blocks(K)
        padded = F.pad(a, (0, nk * BLOCK - K, 0, nr * BLOCK - R))
        amax = padded.view(nr, BLOCK, nk, BLOCK).amax(dim=(1, 3))
    elif scaling == "row":
        amax = a.amax(dim=1, keepdim=True) if K else a.new_zeros(R, 1)
    elif scaling == "tensor":
        if amax is None:
            amax = a.amax() if a.numel() else a.new_zeros(())
    else:
        raise ValueError(f"unknown scaling {scaling!r}")
    scale = scale_from_amax(amax)
    data = cast_to_fp8(x, _expand(scale, scaling, R, K)).contiguous()
    out_scale = empty_scale(scaling, R, K, x.device)
    out_scale.copy_(scale)
    return Fp8Tensor(data, out_scale, scaling)


def quantize_columns_reference(x: Tensor, scaling: str, amax: Tensor | None = None
                               ) -> Fp8Tensor:
    """x [M, K] -> the operand of x^T: data [K, M], groups along M (x^T's rows quantisation)."""
    return quantize_rows_reference(x.t(), scaling, amax)


def quantize_weight_reference(w: Tensor, scaling: str) -> Fp8Tensor:
    """w [N, K] -> Fp8Tensor [N, K] (block128x128, row or tensor)."""
    return quantize_rows_reference(w, scaling)


def dequantize(t: Fp8Tensor) -> Tensor:
    """The fp32 matrix [R, K] an Fp8Tensor encodes: data * scale, group by group."""
    R, K = t.data.shape
    return t.data.float() * _expand(t.scale.float(), t.scaling, R, K)


def fp8_gemm_reference(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.bfloat16
                       ) -> Tensor:
    """a @ b^T of the dequantised operands, in fp32, cast to out_dtype. a: [M, K], b: [N, K]."""
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"contraction dims differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    return (dequantize(a) @ dequantize(b).t()).to(out_dtype)
