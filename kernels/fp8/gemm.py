"""The FP8 GEMM: `fp8_gemm(a, b) = a @ b^T` for Fp8Tensor operands (format: tensor.py).

Which GEMM runs each recipe (a.scaling x b.scaling) on CUDA:
  tensor     x tensor        torch._scaled_mm, scalar scales              (tensorwise recipe)
  row        x row           torch._scaled_mm, scale_a [M, 1], scale_b [1, N]   (rowwise recipe)
  block1x128 x block128x128  F.scaled_mm BlockWise1x128 x BlockWise128x128 (fwd, dgrad; blockwise)
  block1x128 x block1x128    F.scaled_mm BlockWise1x128 x BlockWise1x128   (wgrad; blockwise)
Other pairs raise ValueError. CPU tensors run `fp8_gemm_reference` (dequantise, fp32 matmul).

cuBLAS reads mat_a = a.data row-major and mat_b = b.data.t() column-major, so both operands stay
as produced. Its shape rules are met by zero padding (rare shapes only; padded rows and columns
contribute nothing and are sliced off): the contraction dim and N to multiples of 16, and for
block1x128 x * the M of a to a multiple of BLOCKWISE_M_ALIGN (its scales' leading dim). The
blockwise kernels need SM90 (Hopper) and cuBLASLt >= 12.9; elsewhere torch raises.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import fp8_gemm_reference
from .tensor import Fp8Tensor, empty_scale

__all__ = ["fp8_gemm", "GEMMS"]

GEMMS = {
    ("tensor", "tensor"): "torch._scaled_mm tensorwise",
    ("row", "row"): "torch._scaled_mm rowwise",
    ("block1x128", "block128x128"): "F.scaled_mm BlockWise1x128 x BlockWise128x128",
    ("block1x128", "block1x128"): "F.scaled_mm BlockWise1x128 x BlockWise1x128",
}
K_ALIGN = N_ALIGN = 16  # torch._scaled_mm / scaled_mm: K and N divisible by 16
# block1x128 scales of a are [M, K/128] with strides (1, M); cuBLAS wants 16-byte aligned
# leading dims (an assumption the GPU tests check with odd M).
BLOCKWISE_M_ALIGN = 4

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(key: str, level: int, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _blockwise_api():
    """(torch.nn.functional.scaled_mm, ScalingType) or None where this torch lacks them."""
    scaled_mm = getattr(F, "scaled_mm", None)
    scaling_type = getattr(F, "ScalingType", None)
    if scaled_mm is None or scaling_type is None:
        return None
    return scaled_mm, scaling_type


def _pad(t: Fp8Tensor, rows: int, cols: int) -> Fp8Tensor:
    """t zero-padded to data [rows, cols]; padding rows get scale 1 (their data is zero). The
    block counts of block scales do not change: rows and cols round up to at most the next
    multiple of 128."""
    R, K = t.data.shape
    if (rows, cols) == (R, K):
        return t
    data = F.pad(t.data.view(torch.uint8), (0, cols - K, 0, rows - R)).view(t.data.dtype)
    scale = t.scale
    if t.scaling in ("block1x128", "row") and rows != R:
        scale = empty_scale(t.scaling, rows, cols, t.scale.device).fill_(1.0)
        scale[:R].copy_(t.scale)
    return Fp8Tensor(data, scale, t.scaling)


def _outer_major(scale: Tensor) -> Tensor:
    """A block1x128 scale [R, nb] with strides (1, R), as cuBLAS reads it (copies otherwise)."""
    R = scale.shape[0]
    if scale.stride(0) == 1 and (scale.stride(1) == R or scale.shape[1] == 1):
        return scale
    return scale.t().contiguous().t()


def _block128_scale_b(scale: Tensor) -> Tensor:
    """mat_b's scale for BlockWise128x128 from b's [nbN, nbK] scale: [L4, nbN] with strides
    (1, L4), L4 = nbK rounded up to 4 (torch's rule; the padding columns are never read)."""
    nbn, nbk = scale.shape
    l4 = _round_up(nbk, 4)
    if l4 != nbk or not scale.is_contiguous():
        padded = torch.ones(nbn, l4, dtype=torch.float32, device=scale.device)
        padded[:, :nbk].copy_(scale)
        scale = padded
    return scale.t()


def _describe(t: Fp8Tensor) -> str:
    return (f"{t.scaling} data {tuple(t.data.shape)} scale {tuple(t.scale.shape)} strides "
            f"{tuple(t.scale.stride())}")


def _cuda_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype, use_fast_accum: bool
               ) -> Tensor:
    M, K = a.data.shape
    N = b.data.shape[0]
    blockwise = a.scaling == "block1x128"
    m_pad = _round_up(M, BLOCKWISE_M_ALIGN) if blockwise else M
    k_pad = _round_up(K, K_ALIGN)
    n_pad = _round_up(N, N_ALIGN)  # also aligns a block1x128 b's scales (N_ALIGN % 4 == 0)
    a = _pad(a, m_pad, k_pad)
    b = _pad(b, n_pad, k_pad)
    if blockwise:
        api = _blockwise_api()
        if api is None:
            _log_once("no-blockwise", logging.WARNING,
                      f"torch {torch.__version__} has no torch.nn.functional.scaled_mm / "
                      "ScalingType (torch >= 2.10): blockwise FP8 GEMMs run the dequantising "
                      "PyTorch reference (slow)")
            out = fp8_gemm_reference(a, b, out_dtype)
        else:
            scaled_mm, st = api
            if b.scaling == "block128x128":
                scale_b, recipe_b = _block128_scale_b(b.scale), st.BlockWise128x128
            else:
                scale_b, recipe_b = _outer_major(b.scale), st.BlockWise1x128
            out = scaled_mm(a.data, b.data.t(), _outer_major(a.scale), st.BlockWise1x128,
                            scale_b, recipe_b, output_dtype=out_dtype)
    else:
        scale_a, scale_b = a.scale, b.scale
        if a.scaling == "row":
            scale_a, scale_b = a.scale.reshape(-1, 1).contiguous(), b.scale.reshape(1, -1)
        out = torch._scaled_mm(a.data, b.data.t(), scale_a=scale_a.float(),
                               scale_b=scale_b.float().contiguous(), out_dtype=out_dtype,
                               use_fast_accum=use_fast_accum)
    if (m_pad, n_pad) != (M, N):
        out = out[:M, :N].contiguous()
    return out


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
             use_fast_accum: bool = False) -> Tensor:
    """a @ b^T -> [M, N] in out_dtype (bf16, fp16 or fp32), accumulated in fp32.

    a: data [M, K], b: data [N, K] (K = contraction dim), scalings a pair of GEMMS.
    use_fast_accum: Hopper's faster, less precise FP8 accumulation (tensor and row pairs only;
    the blockwise kernels do not support it, so it is ignored there).
    """
    pair = (a.scaling, b.scaling)
    if pair not in GEMMS:
        raise ValueError(f"no FP8 GEMM for a {a.scaling} x b {b.scaling}; supported pairs: "
                         f"{sorted(GEMMS)}")
    if a.data.dim() != 2 or b.data.dim() != 2 or a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"fp8_gemm computes a [M, K] @ b[N, K]^T; got a {tuple(a.data.shape)}, "
                         f"b {tuple(b.data.shape)}")
    if not a.data.is_cuda:
        _log_once("cpu", logging.INFO, "fp8_gemm: CPU tensors run the PyTorch reference")
        return fp8_gemm_reference(a, b, out_dtype)
    _log_once(f"cuda {pair}", logging.INFO, f"fp8_gemm {pair}: {GEMMS[pair]}")
    try:
        return _cuda_gemm(a, b, out_dtype, use_fast_accum and a.scaling != "block1x128")
    except (RuntimeError, ValueError) as e:  # NotImplementedError is a RuntimeError
        raise RuntimeError(f"fp8_gemm {GEMMS[pair]} failed for a: {_describe(a)}; b: "
                           f"{_describe(b)}; out_dtype {out_dtype}: {e}") from e
