"""Triton FP8 quantisers: bf16/fp16/fp32 matrices to `Fp8Tensor` operands (format: tensor.py).

Public functions (x [M, K], any strides; the result equals `reference.py` exactly):
  quantize_rows(x, scaling)              data [M, K]   (forward GEMM / dgrad operand)
  quantize_columns(x, scaling)           data [K, M]   (x^T, groups along M: wgrad operand)
  quantize_rows_and_columns(x, scaling)  both, from one read of x
  quantize_forms(x, scaling, rows, cols) whichever of the two are asked for (None for the other)
  quantize_weight(w, scaling)            w [N, K] -> data [N, K]
  quantize_weight_and_transpose(w, s)    (w, the dgrad operand of w^T [K, N]) from one read of w
  transpose_fp8(t)                       the exact FP8 operand of t^T (block128x128, tensor)
Activation scalings: block1x128, row, tensor. Weight scalings: block128x128, row, tensor.

Kernels:
  `_cast_tile_kernel` one program per [BM, BK] tile: loads it once, derives the group scales
      (block1x128: row-block and column-block amax of the tile; block128x128: tile amax) or reads
      precomputed amaxes (row, tensor), and writes the rows form, the transposed columns form, or
      both. block1x128 columns and block128x128 need 128 x 128 tiles.
  `_amax_tensor_kernel` (tensor) persistent flat grid-stride max, one fp32 atomic_max per
      program; skipped under delayed scaling (an AmaxHistory), where the cast records the amax;
  `_amax_lines_kernel` (row, columns form) per-row / per-column atomic_max over tiles;
  `_rowwise_rows_kernel` (row, rows form) one program per row tile: an amax sweep over K, then
      the cast sweep (the second read mostly hits L2).
So block1x128 and delayed tensor scaling cost one launch, tensor and row-with-columns three (zero
fill, amax, cast).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1; other CPU tensors take the
PyTorch reference (logged once).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .amax_history import AmaxHistory
from .tensor import BLOCK, FP8_DTYPE, Fp8Tensor, empty_scale
from kernels.triton_support import interpreting, sm_count, use_triton

from .triton_cast import fp8_cast, fp8_inverse, fp8_scale, history_scale

__all__ = ["quantize_rows", "quantize_columns", "quantize_rows_and_columns", "quantize_forms",
           "quantize_weight",
           "quantize_weight_and_transpose", "transpose_fp8", "ACTIVATION_SCALINGS",
           "WEIGHT_SCALINGS"]

ACTIVATION_SCALINGS = ("block1x128", "row", "tensor")
WEIGHT_SCALINGS = ("block128x128", "row", "tensor")

logger = logging.getLogger(__name__)

# Group kinds of `_cast_tile_kernel` (constexpr codes).
G_BLOCK1D, G_BLOCK2D, G_ROW, G_TENSOR = 0, 1, 2, 3
_GROUP = {"block1x128": G_BLOCK1D, "block128x128": G_BLOCK2D, "row": G_ROW, "tensor": G_TENSOR}
# `_cast_tile_kernel` tiles: BK = 128 always; BM = 128 where groups span 128 rows (block1x128
# columns, block128x128), else CAST_BM, which measured fastest on the H100 (64 x 128 at 4 warps:
# ~2.7 TB/s for tensor-scaled rows and columns, against 128 x 128 at 8 warps ~2.3 TB/s).
CAST_BM = 64
TILE_WARPS = 4
AMAX_CHUNK, AMAX_PROGRAMS_PER_SM = 4096, 8  # `_amax_tensor_kernel`
ROWWISE_BM, ROWWISE_BK = 16, 512  # `_rowwise_rows_kernel` tile


@triton.jit
def _line_scales(x, amax_ptr, offs, mask, pid_other, scale_ptr, stride0, stride1,
                 AXIS: tl.constexpr, FROM_TILE: tl.constexpr):
    """Stores the scales of the tile's rows (AXIS 1) or columns (AXIS 0), lines at offs: from
    the tile (block1x128, written by every tile) or from precomputed amaxes (row, written once).
    Returns their inverses (what the cast multiplies by)."""
    if FROM_TILE:
        s = fp8_scale(tl.max(tl.abs(x), axis=AXIS))
        tl.store(scale_ptr + offs * stride0 + pid_other * stride1, s, mask=mask)
    else:
        s = fp8_scale(tl.load(amax_ptr + offs, mask=mask, other=0.0))
        if pid_other == 0:
            tl.store(scale_ptr + offs * stride0, s, mask=mask)
    return fp8_inverse(s)


@triton.jit(do_not_specialize=["slot"])  # one compile for every history slot
def _cast_tile_kernel(x_ptr, M, K, stride_xm, stride_xk,
                      qr_ptr, sr_ptr, stride_sr0, stride_sr1,
                      qc_ptr, sc_ptr, stride_sc0, stride_sc1,
                      amax_r_ptr, amax_c_ptr, n_amax, slot,
                      GROUP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, EXACT_ROUND: tl.constexpr,
                      AMAX_SLOTS: tl.constexpr, RECORD: tl.constexpr):
    """Tile (pid_m, pid_k) of x [M, K] -> rows data qr [M, K] and/or columns data qc [K, M]
    (both contiguous) with their scales (sr, sc: any strides; sc of block128x128 is [nbK, nbM]).
    amax_r / amax_c: precomputed row / column amaxes (row); for tensor, n_amax amaxes whose max
    (leaving out index `slot`, -1: none) gives the scale, and with RECORD the tile's amax is
    atomic_max'ed into amax_r[slot] (delayed scaling: amax_history.py)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    om = offs_m.to(tl.int64)
    ok = offs_k.to(tl.int64)
    # Masked elements load as 0, which no amax sees.
    x = tl.load(x_ptr + om[:, None] * stride_xm + ok[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)

    if GROUP == 1 or GROUP == 3:  # one scale per tile (block128x128) or per tensor
        if GROUP == 1:
            s = fp8_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
        else:
            s = history_scale(amax_r_ptr, n_amax, slot, AMAX_SLOTS)
            if RECORD:  # amax >= 0, for which fp32 atomic_max is exact
                tl.atomic_max(amax_r_ptr + slot, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
        q = fp8_cast(x, fp8_inverse(s), EXACT_ROUND)
        qc = q
        if GROUP == 1:
            if ROWS:
                tl.store(sr_ptr + pid_m * stride_sr0 + pid_k * stride_sr1, s)
            if COLS:
                tl.store(sc_ptr + pid_k * stride_sc0 + pid_m * stride_sc1, s)
        elif (pid_m == 0) & (pid_k == 0):
            if ROWS:
                tl.store(sr_ptr, s)
            if COLS:
                tl.store(sc_ptr, s)
    else:  # per-row groups for the rows form, per-column groups for the columns form
        if ROWS:
            inv_r = _line_scales(x, amax_r_ptr, om, mask_m, pid_k, sr_ptr, stride_sr0,
                                 stride_sr1, 1, GROUP == 0)
            q = fp8_cast(x, inv_r[:, None], EXACT_ROUND)
        if COLS:
            inv_c = _line_scales(x, amax_c_ptr, ok, mask_k, pid_m, sc_ptr, stride_sc0,
                                 stride_sc1, 0, GROUP == 0)
            qc = fp8_cast(x, inv_c[None, :], EXACT_ROUND)
    if ROWS:
        tl.store(qr_ptr + om[:, None] * K + ok[None, :], q, mask=mask)
    if COLS:
        tl.store(qc_ptr + ok[:, None] * M + om[None, :], tl.trans(qc),
                 mask=mask_k[:, None] & mask_m[None, :])


@triton.jit
def _amax_tensor_kernel(x_ptr, N, K, stride_xm, stride_xk, amax_ptr,
                        B: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """amax_ptr[0] = max(amax_ptr[0], max |x|) over the N elements of x [N / K, K]: a persistent
    grid-stride sweep over runs of B elements in row-major order, one fp32 atomic_max per
    program."""
    acc = tl.zeros((B,), dtype=tl.float32)
    for start in range(tl.program_id(0) * B, N, tl.num_programs(0) * B):
        i = (start + tl.arange(0, B)).to(tl.int64)
        offs = i if CONTIGUOUS else (i // K) * stride_xm + (i % K) * stride_xk
        acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + offs, mask=i < N, other=0.0).to(tl.float32)))
    # amax >= 0, for which fp32 atomic_max is exact.
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


@triton.jit
def _amax_lines_kernel(x_ptr, M, K, stride_xm, stride_xk, amax_r_ptr, amax_c_ptr,
                       ROWS: tl.constexpr, COLS: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr):
    """Row amaxes [M] and/or column amaxes [K] of x (zero-filled buffers), tile by tile."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_m = offs_m < M
    mask_k = offs_k < K
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
                + offs_k.to(tl.int64)[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    a = tl.abs(x.to(tl.float32))
    if ROWS:
        tl.atomic_max(amax_r_ptr + offs_m, tl.max(a, axis=1), mask=mask_m)
    if COLS:
        tl.atomic_max(amax_c_ptr + offs_k, tl.max(a, axis=0), mask=mask_k)


@triton.jit
def _rowwise_rows_kernel(x_ptr, M, K, stride_xm, stride_xk, q_ptr, s_ptr,
                         BM: tl.constexpr, BK: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """Rows [pid * BM, +BM) of x -> q [M, K] contiguous, one scale per row (s [M, 1])."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    om = offs_m.to(tl.int64)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ok = (k0 + tl.arange(0, BK)).to(tl.int64)
        x = tl.load(x_ptr + om[:, None] * stride_xm + ok[None, :] * stride_xk,
                    mask=mask_m[:, None] & (ok < K)[None, :], other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    s = fp8_scale(tl.max(acc, axis=1))
    tl.store(s_ptr + om, s, mask=mask_m)
    inv = fp8_inverse(s)[:, None]
    for k0 in range(0, K, BK):
        ok = (k0 + tl.arange(0, BK)).to(tl.int64)
        mask = mask_m[:, None] & (ok < K)[None, :]
        x = tl.load(x_ptr + om[:, None] * stride_xm + ok[None, :] * stride_xk, mask=mask,
                    other=0.0).to(tl.float32)
        tl.store(q_ptr + om[:, None] * K + ok[None, :], fp8_cast(x, inv, EXACT_ROUND), mask=mask)


def _check(x: Tensor, scaling: str, allowed: tuple[str, ...], what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(x.shape)}")
    if scaling not in allowed:
        raise ValueError(f"{what} scaling must be one of {allowed}, got {scaling!r}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"{what} must be bf16, fp16 or fp32, got {x.dtype}")


def _num_programs(x: Tensor) -> int:
    """Programs of the persistent amax sweep: AMAX_PROGRAMS_PER_SM per SM (4 in the
    interpreter), no more than there are chunks."""
    chunks = triton.cdiv(x.numel(), AMAX_CHUNK)
    if interpreting() or not x.is_cuda:
        return min(chunks, 4)
    return min(chunks, AMAX_PROGRAMS_PER_SM * sm_count(x.device))


def _or(t: Tensor | None, default: Tensor) -> Tensor:
    return default if t is None else t


def _strides2(scale: Tensor | None) -> tuple[int, int]:
    return tuple(scale.stride()) if scale is not None and scale.dim() == 2 else (0, 0)


def _reference_quantize(x: Tensor, scaling: str, rows: bool, cols: bool,
                        history: AmaxHistory | None
                        ) -> tuple[Fp8Tensor | None, Fp8Tensor | None]:
    amax = None
    if history is not None:
        s = history.next_slot(x.device)
        own = x.detach().float().abs().amax() if x.numel() else x.new_zeros((), dtype=torch.float32)
        amax = own if s.bootstrap else history.scale_amax(s)
        s.amaxes[s.slot] = own
    return (reference.quantize_rows_reference(x, scaling, amax) if rows else None,
            reference.quantize_columns_reference(x, scaling, amax) if cols else None)


def _quantize(x: Tensor, scaling: str, rows: bool, cols: bool,
              history: AmaxHistory | None = None
              ) -> tuple[Fp8Tensor | None, Fp8Tensor | None]:
    """Rows and/or columns forms of x [M, K] under any of the four scalings (block128x128's
    columns form is the exact transpose: data [K, M], scale [nbK, nbM]); tensor scaling takes
    its scale from `history` where given (delayed scaling)."""
    if history is not None and scaling != "tensor":
        raise ValueError(f"an amax history (delayed scaling) needs tensor scaling, got {scaling!r}")
    if not use_triton(x, "fp8 quantisers", logger) or x.numel() == 0:  # (empty: nothing to launch)
        return _reference_quantize(x, scaling, rows, cols, history)
    M, K = x.shape
    dev = x.device
    exact = interpreting()
    qr = torch.empty(M, K, dtype=FP8_DTYPE, device=dev) if rows else None
    sr = empty_scale(scaling, M, K, dev) if rows else None
    qc = torch.empty(K, M, dtype=FP8_DTYPE, device=dev) if cols else None
    sc = empty_scale(scaling, K, M, dev) if cols else None

    if scaling == "row" and not cols:
        grid = (triton.cdiv(M, ROWWISE_BM),)
        _rowwise_rows_kernel[grid](x, M, K, x.stride(0), x.stride(1), qr, sr, BM=ROWWISE_BM,
                                   BK=ROWWISE_BK, EXACT_ROUND=exact, num_warps=4)
        return Fp8Tensor(qr, sr, scaling), None

    BK = BLOCK
    BM = BLOCK if scaling == "block128x128" or (scaling == "block1x128" and cols) else CAST_BM
    grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
    amax_r = amax_c = None
    n_amax, slot, record = 1, -1, False
    if scaling == "tensor":
        if history is None:
            amax_r = torch.zeros(1, dtype=torch.float32, device=dev)
            sweep = amax_r
        else:
            s = history.next_slot(dev)
            amax_r, n_amax = s.amaxes, s.amaxes.numel()
            sweep = amax_r[s.slot:s.slot + 1] if s.bootstrap else None
            # The bootstrap cast reads the amax the sweep recorded (every other slot is 0).
            slot, record = (-1, False) if s.bootstrap else (s.slot, True)
        if sweep is not None:
            _amax_tensor_kernel[(_num_programs(x),)](
                x, x.numel(), K, x.stride(0), x.stride(1), sweep, B=AMAX_CHUNK,
                CONTIGUOUS=x.is_contiguous(), num_warps=8)
    elif scaling == "row":
        amax_r = torch.zeros(M, dtype=torch.float32, device=dev) if rows else None
        amax_c = torch.zeros(K, dtype=torch.float32, device=dev)
        _amax_lines_kernel[grid](x, M, K, x.stride(0), x.stride(1), _or(amax_r, amax_c), amax_c,
                                 ROWS=rows, COLS=cols, BM=BM, BK=BK, num_warps=TILE_WARPS)
    # Slots a configuration does not use get x: never dereferenced (constexpr branches).
    _cast_tile_kernel[grid](
        x, M, K, x.stride(0), x.stride(1),
        _or(qr, x), _or(sr, x), *_strides2(sr), _or(qc, x), _or(sc, x), *_strides2(sc),
        _or(amax_r, x), _or(amax_c, x), n_amax, slot,
        GROUP=_GROUP[scaling], ROWS=rows, COLS=cols, BM=BM, BK=BK, EXACT_ROUND=exact,
        AMAX_SLOTS=triton.next_power_of_2(n_amax), RECORD=record, num_warps=TILE_WARPS)
    return (Fp8Tensor(qr, sr, scaling) if rows else None,
            Fp8Tensor(qc, sc, scaling) if cols else None)


def quantize_rows(x: Tensor, scaling: str, history: AmaxHistory | None = None) -> Fp8Tensor:
    """x [M, K] -> Fp8Tensor data [M, K]; scaling: block1x128 (scale [M, ceil(K/128)],
    K-block-major), row ([M, 1]) or tensor ([]). history (tensor scaling only): delayed scaling,
    the scale from the amax history, x's amax recorded into it (amax_history.py)."""
    _check(x, scaling, ACTIVATION_SCALINGS, "x")
    return _quantize(x, scaling, rows=True, cols=False, history=history)[0]


def quantize_columns(x: Tensor, scaling: str, history: AmaxHistory | None = None) -> Fp8Tensor:
    """x [M, K] -> the operand of x^T: data [K, M], groups along M (block1x128 scale
    [K, ceil(M/128)] M-block-major, row [K, 1], tensor []). history: as in quantize_rows."""
    _check(x, scaling, ACTIVATION_SCALINGS, "x")
    return _quantize(x, scaling, rows=False, cols=True, history=history)[1]


def quantize_rows_and_columns(x: Tensor, scaling: str, history: AmaxHistory | None = None
                              ) -> tuple[Fp8Tensor, Fp8Tensor]:
    """(quantize_rows(x), quantize_columns(x)) from one read of x (row scaling, and tensor
    scaling without a history, read it twice: amax sweep, then the cast). history: as in
    quantize_rows."""
    _check(x, scaling, ACTIVATION_SCALINGS, "x")
    return _quantize(x, scaling, rows=True, cols=True, history=history)


def quantize_forms(x: Tensor, scaling: str, rows: bool, columns: bool,
                   history: AmaxHistory | None = None
                   ) -> tuple[Fp8Tensor | None, Fp8Tensor | None]:
    """(quantize_rows(x) if rows, quantize_columns(x) if columns), None for a form not asked for;
    both from one read where both are asked for. history: as in quantize_rows."""
    _check(x, scaling, ACTIVATION_SCALINGS, "x")
    if not (rows or columns):
        raise ValueError("quantize_forms: ask for rows, columns or both")
    return _quantize(x, scaling, rows=rows, cols=columns, history=history)


def quantize_weight(w: Tensor, scaling: str) -> Fp8Tensor:
    """w [N, K] -> Fp8Tensor data [N, K]; scaling: block128x128 (scale [ceil(N/128),
    ceil(K/128)]), row ([N, 1]) or tensor ([])."""
    _check(w, scaling, WEIGHT_SCALINGS, "w")
    return _quantize(w, scaling, rows=True, cols=False)[0]


def quantize_weight_and_transpose(w: Tensor, scaling: str) -> tuple[Fp8Tensor, Fp8Tensor]:
    """(quantize_weight(w), the dgrad operand of w^T: data [K, N]) from one read of w. For
    block128x128 and tensor the second is the exact transpose of the first (transpose_fp8); row
    scaling is not transposable, so its second is w's columns quantised per row of w^T."""
    _check(w, scaling, WEIGHT_SCALINGS, "w")
    return _quantize(w, scaling, rows=True, cols=True)


def transpose_fp8(t: Fp8Tensor) -> Fp8Tensor:
    """The Fp8Tensor of the transposed matrix, exact for block128x128 and tensor scaling (data
    and scale transposed). block1x128 and row groups do not survive a transpose: re-quantise the
    columns of the source (quantize_columns) instead."""
    if t.scaling not in ("block128x128", "tensor"):
        raise ValueError(f"{t.scaling} scaling is not transposable: its groups run along the "
                         "contraction dim; re-quantise with quantize_columns instead")
    return Fp8Tensor(t.data.t().contiguous(), t.scale.t().contiguous(), t.scaling)
