"""FP8 grouped GEMMs over expert groups (`torch._scaled_grouped_mm`, rowwise) and their quantisers.

Operand formats and their PyTorch ground truth: grouped_reference.py. With offs the end offsets of
the expert groups along the token rows (int32 [E], on the device):

  grouped_mm(a, w, offs)     a [T, K] rows form, w expert weight [E*N, K] -> [T, N]
                             (forward: x @ W^T; dgrad: dy @ W, with w the quantised W^T)
  grouped_wgrad(a, b)        a [M, T_cap], b [N, T_cap] GroupColumns -> [E, M, N], a_e @ b_e^T
                             (weight gradient: contracts the tokens of each expert)

Quantisers (Triton; equal to the references exactly):
  quantize_rows(x)                       x [T, K] -> rows form, one scale per row
  quantize_expert_weight(w, transpose)   w [E, N, K] (or w^T) -> one scale per (expert, column)
  quantize_group_columns(x, offs, poffs) x [T, C] -> GroupColumns, one scale per (expert, column)
  quantize_swiglu_rows / _columns        the same two forms of a = silu(gate) * up * probs,
                                         computed from h [T, 2F] on the fly (a is never stored)

How `torch._scaled_grouped_mm` is called (torch 2.11, SM90 CUTLASS rowwise kernel):
  2-D x 3-D (forward, dgrad): mat_a = a.data [T, K] row-major, scale_a [T] (fp32, contiguous);
      mat_b = w.data viewed [E, N, K] then transposed to [E, K, N] (column-major, as stored),
      scale_b [E, N]; offs = group end offsets. Groups along T need no alignment (the kernel
      checks 16-byte alignment only along a dynamic K or N dimension).
  2-D x 2-D (wgrad): mat_a = a.data [M, T_cap] row-major, scale_a [E * M] (expert-major flat);
      mat_b = b.data.t() [T_cap, N] column-major, scale_b [E * N]; offs = padded end offsets
      (every group a multiple of 16 tokens: the kernel device-asserts it; GroupColumns pads, and
      gives an expert without tokens 16 zero columns, so that no group has an empty contraction
      whose output the kernel might leave unwritten: its gradient is exactly zero).
  The scales are *decoding* scales (torch multiplies the accumulator by scale_a[row] *
  scale_b[col]); our format stores decoding scales, so they are passed as they are. K and N must
  be multiples of 16, at most 1023 groups, output bf16.

Backends (`set_backend`): "torch" runs `torch._scaled_grouped_mm` (CUDA, SM90/SM100); "emulated"
runs the references (dequantise, fp32 matmul per expert: the CPU path); "auto" (default) picks
torch for CUDA tensors. Quantisers run Triton on CUDA tensors or under TRITON_INTERPRET=1, else the
references. The first call on each path logs which path runs.

Cost note: the expert weights are quantised on every call (each form reads the bf16 weight twice,
the second sweep mostly from L2), a cost that grows with E and not with the tokens: at E = 256,
d = 2048, F = 512 the four forms read ~3.2 GB per forward+backward (benchmarks/expert_mlp.py times
them). Caching the quantised weights across micro-batches would remove it, at their memory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_support import ROUND_CODES, interpreting, log_once, use_triton

from . import grouped_reference as ref
from .grouped_reference import GroupColumns, padded_capacity
from .tensor import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, Fp8Tensor
from .triton_cast import fp8_cast, fp8_inverse, fp8_scale, round_to_code

__all__ = ["grouped_mm", "grouped_wgrad", "quantize_rows", "quantize_expert_weight",
           "quantize_group_columns", "quantize_swiglu_rows", "quantize_swiglu_columns",
           "set_backend", "get_backend", "use_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "emulated")
# CUTLASS FastAccum (no periodic promotion of the FP8 MMA accumulator to full fp32): faster, less
# accurate at large K. Off by default; benchmarks/expert_mlp.py measures both.
FAST_ACCUM = False

logger = logging.getLogger(__name__)
_backend = "auto"


def set_backend(name: str) -> None:
    """Selects the GEMM backend for later calls: one of BACKENDS."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"fp8 grouped GEMM backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """set_backend(name) for the duration of a with-block (tests, benchmarks)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _log_once(key: tuple, message: str) -> None:
    log_once(("fp8 grouped",) + key, message, logger)


# -- Triton kernels ----------------------------------------------------------------------------

@triton.jit
def _load_tile(x_ptr, p_ptr, row_off, rows, cols, mask_r, mask_c, stride_c, gate_up_off,
               SWIGLU: tl.constexpr, ROUND: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """fp32 tile [len(rows), len(cols)] of x, or with SWIGLU of a = silu(gate) * up * p (gate at
    column c of x, up at column c + gate_up_off, p[row]) rounded to x's dtype. Masked: 0."""
    mask = mask_r[:, None] & mask_c[None, :]
    ptrs = x_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_c
    v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.load(ptrs + gate_up_off, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)
        v = round_to_code(v * tl.sigmoid(v) * up * p[:, None], ROUND, EXACT_ROUND)
    return v


@triton.jit
def _rows_kernel(x_ptr, p_ptr, q_ptr, s_ptr, N, K, stride_b, stride_n, stride_k, gate_up_off,
                 SWIGLU: tl.constexpr, ROUND: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                 EXACT_ROUND: tl.constexpr):
    """Rows n in [pid0*BM, +BM) of matrix b = pid1 of x [B, N, K] (strides stride_b, stride_n,
    stride_k) -> q[b*N + n, :] (q [B*N, K] contiguous) and s[b*N + n] (one scale per row). Two
    sweeps over K: amax, then cast (the second mostly hits L2). A tile never straddles two
    matrices, which keeps its row addresses an arange (coalesced loads of transposed views)."""
    b = tl.program_id(1)
    n = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_r = n < N
    row_off = b.to(tl.int64) * stride_b + n.to(tl.int64) * stride_n
    r64 = b.to(tl.int64) * N + n
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        v = _load_tile(x_ptr, p_ptr, row_off, r64, cols, mask_r, cols < K, stride_k,
                       gate_up_off, SWIGLU, ROUND, EXACT_ROUND)
        acc = tl.maximum(acc, tl.abs(v))
    s = fp8_scale(tl.max(acc, axis=1))
    tl.store(s_ptr + r64, s, mask=mask_r)
    inv = fp8_inverse(s)[:, None]
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        mask_c = cols < K
        v = _load_tile(x_ptr, p_ptr, row_off, r64, cols, mask_r, mask_c, stride_k,
                       gate_up_off, SWIGLU, ROUND, EXACT_ROUND)
        tl.store(q_ptr + r64[:, None] * K + cols[None, :], fp8_cast(v, inv, EXACT_ROUND),
                 mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _group_columns_kernel(x_ptr, p_ptr, offs_ptr, poffs_ptr, q_ptr, s_ptr, C, T_CAP,
                          stride_t, stride_c, gate_up_off,
                          SWIGLU: tl.constexpr, ROUND: tl.constexpr, BT: tl.constexpr,
                          BC: tl.constexpr, ALIGN: tl.constexpr,
                          EXACT_ROUND: tl.constexpr):
    """Columns [pid0*BC, +BC) of expert group e = pid1 of x [T, C] (rows offs[e-1]:offs[e]) ->
    q[c, poffs[e-1] + i] = e4m3 of x[offs[e-1] + i, c] / s[e, c], zeros up to poffs[e];
    s [E, C] contiguous. Two sweeps over the group's rows: column amax, then cast."""
    e = tl.program_id(1)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    pstart = tl.load(poffs_ptr + e - 1, mask=e > 0, other=0)
    pend = tl.load(poffs_ptr + e)
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    mask_c = cols < C
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for t0 in range(start, end, BT):
        rows = t0 + tl.arange(0, BT)
        v = _load_tile(x_ptr, p_ptr, rows.to(tl.int64) * stride_t, rows, cols, rows < end,
                       mask_c, stride_c, gate_up_off, SWIGLU, ROUND, EXACT_ROUND)
        acc = tl.maximum(acc, tl.abs(v))
    s = fp8_scale(tl.max(acc, axis=0))
    tl.store(s_ptr + e.to(tl.int64) * C + c64, s, mask=mask_c)
    inv = fp8_inverse(s)[None, :]
    for t0 in range(start, end, BT):
        rows = t0 + tl.arange(0, BT)
        mask_r = rows < end
        v = _load_tile(x_ptr, p_ptr, rows.to(tl.int64) * stride_t, rows, cols, mask_r,
                       mask_c, stride_c, gate_up_off, SWIGLU, ROUND, EXACT_ROUND)
        q = fp8_cast(v, inv, EXACT_ROUND)
        dst = (pstart + rows - start).to(tl.int64)
        tl.store(q_ptr + c64[:, None] * T_CAP + dst[None, :], tl.trans(q),
                 mask=mask_c[:, None] & mask_r[None, :])
    # The group's padding: zeros, so that they add nothing to the wgrad products.
    pad = pstart + (end - start) + tl.arange(0, ALIGN)
    tl.store(q_ptr + c64[:, None] * T_CAP + pad.to(tl.int64)[None, :],
             tl.zeros((BC, ALIGN), dtype=tl.float32).to(tl.float8e4nv),
             mask=mask_c[:, None] & (pad < pend)[None, :])


# -- quantiser launchers -----------------------------------------------------------------------

def _consts() -> dict:
    return dict(EXACT_ROUND=interpreting())


def _check_activation(x: Tensor, what: str) -> None:
    if x.dim() != 2 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"{what} must be a 2-D bf16/fp16/fp32 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{what} must have a unit last stride, got strides {x.stride()}")


def launch_rows(x3: Tensor, q: Tensor, s: Tensor, probs: Optional[Tensor] = None) -> None:
    """Rows of x3 [B, N, K'] (any strides; 2-D inputs as [1, R, K']) quantised into q [B*N, K]
    and s [B*N] (caller-allocated). With probs, x3 is h [1, T, 2F] and the rows are those of
    a = silu(gate) * up * probs (K = F)."""
    B, N, Kx = x3.shape
    R = B * N
    swiglu = probs is not None
    K = Kx // 2 if swiglu else Kx
    if R == 0 or K == 0:
        s.fill_(AMAX_FLOOR / FP8_MAX)
        return
    # Rows contiguous in memory (a transposed weight): tall tiles keep the loads coalesced.
    BM, BK = (64, 64) if x3.stride(1) == 1 and Kx > 1 else (16, 512)
    BK = min(BK, triton.next_power_of_2(K))
    _rows_kernel[(triton.cdiv(N, BM), B)](
        x3, x3 if probs is None else probs, q, s, N, K, x3.stride(0), x3.stride(1),
        x3.stride(2), K * x3.stride(2), SWIGLU=swiglu, ROUND=ROUND_CODES[x3.dtype], BM=BM, BK=BK,
        num_warps=4, **_consts())


def launch_group_columns(x: Tensor, offs: Tensor, poffs: Tensor, q: Tensor, s: Tensor,
                         probs: Optional[Tensor] = None) -> None:
    """Group columns of x [T, C] (with probs: of a = SwiGLU(x) * probs, C = x.shape[1] / 2) into
    caller-allocated q [C, T_cap] and s [E, C]; offs / poffs: int32 [E] end offsets."""
    T, Cx = x.shape
    swiglu = probs is not None
    C = Cx // 2 if swiglu else Cx
    E = offs.numel()
    if E == 0 or C == 0:
        return
    BT, BC = 64, 64
    _group_columns_kernel[(triton.cdiv(C, BC), E)](
        x, x if probs is None else probs, offs, poffs, q, s, C, q.shape[1], x.stride(0),
        x.stride(1), C * x.stride(1), SWIGLU=swiglu, ROUND=ROUND_CODES[x.dtype], BT=BT, BC=BC,
        ALIGN=ref.GROUP_ALIGN, num_warps=4, **_consts())


def counts_from_offsets(offs: Tensor) -> Tensor:
    """Group sizes [E] (int64) from end offsets [E]."""
    return torch.diff(offs.long(), prepend=offs.new_zeros(1).long())


def _rows(x3: Tensor, probs: Optional[Tensor]) -> Fp8Tensor:
    B, N, Kx = x3.shape
    K = Kx // 2 if probs is not None else Kx
    q = torch.empty(B * N, K, dtype=FP8_DTYPE, device=x3.device)
    s = torch.empty(B * N, 1, dtype=torch.float32, device=x3.device)
    launch_rows(x3, q, s, probs)
    return Fp8Tensor(q, s, "row")


def quantize_rows(x: Tensor) -> Fp8Tensor:
    """x [T, K] -> Fp8Tensor "row": data [T, K], scale [T, 1] (forward / dgrad A operand)."""
    _check_activation(x, "x")
    if not use_triton(x, "fp8 grouped quantisers", logger):
        return ref.quantize_rows_reference(x)
    return _rows(x.unsqueeze(0), None)


def quantize_expert_weight(w: Tensor, transpose: bool = False) -> Fp8Tensor:
    """w [E, N, K] -> Fp8Tensor "row" data [E*N, K], scale [E*N, 1]: the B operand of
    grouped_mm computing x @ w[e]^T. transpose=True quantises w^T [E, K, N] (data [E*K, N],
    without a transposed copy of w): the operand of dy @ w[e]."""
    if w.dim() != 3 or not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise ValueError(f"expert weight must be a 3-D float tensor, got {w.dtype} "
                         f"{tuple(w.shape)}")
    if not use_triton(w, "fp8 grouped quantisers", logger):
        return ref.quantize_expert_weight_reference(w, transpose)
    return _rows(w.transpose(1, 2) if transpose else w, None)


def quantize_swiglu_rows(h: Tensor, probs: Tensor) -> Fp8Tensor:
    """Rows form of a = silu(h[:, :F]) * h[:, F:] * probs[:, None] (rounded to h's dtype, then
    quantised; a itself is not stored): data [T, F], scale [T, 1]. The fc2 forward operand."""
    _check_activation(h, "h")
    if not use_triton(h, "fp8 grouped quantisers", logger):
        return ref.quantize_rows_reference(ref.swiglu_reference(h, probs))
    return _rows(h.unsqueeze(0), probs.contiguous())


def _group_columns(x: Tensor, offs: Tensor, poffs: Tensor, probs: Optional[Tensor]
                   ) -> GroupColumns:
    T, Cx = x.shape
    C = Cx // 2 if probs is not None else Cx
    E = offs.numel()
    q = torch.empty(C, padded_capacity(T, E), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(E, C, dtype=torch.float32, device=x.device)
    launch_group_columns(x, offs, poffs, q, s, probs)
    return GroupColumns(q, s, poffs)


def quantize_group_columns(x: Tensor, offs: Tensor, poffs: Tensor) -> GroupColumns:
    """x [T, C] -> GroupColumns: data [C, T_cap], scale [E, C] (the wgrad operand). offs, poffs:
    int32 [E] end offsets of the groups and of the padded groups (grouped_reference)."""
    _check_activation(x, "x")
    if not use_triton(x, "fp8 grouped quantisers", logger):
        return ref.quantize_group_columns_reference(x, counts_from_offsets(offs))
    return _group_columns(x, offs, poffs, None)


def quantize_swiglu_columns(h: Tensor, probs: Tensor, offs: Tensor, poffs: Tensor
                            ) -> GroupColumns:
    """GroupColumns of a = silu(gate) * up * probs computed from h [T, 2F] (a not stored): the
    fc2 weight-gradient operand."""
    _check_activation(h, "h")
    if not use_triton(h, "fp8 grouped quantisers", logger):
        return ref.quantize_group_columns_reference(ref.swiglu_reference(h, probs),
                                                    counts_from_offsets(offs))
    return _group_columns(h, offs, poffs, probs.contiguous())


# -- grouped GEMMs -----------------------------------------------------------------------------

def _resolve(t: Tensor) -> str:
    name = _backend
    if name == "auto":
        name = "torch" if t.is_cuda else "emulated"
    if name == "torch" and not (t.is_cuda or t.is_meta):  # meta: shape checks in tests
        raise RuntimeError("fp8 grouped GEMM backend 'torch' needs CUDA tensors; select "
                           "'emulated' or 'auto'")
    _log_once(("gemm", name, t.device.type), f"fp8 grouped GEMM: {name} backend on "
              f"{t.device.type} (selected: {_backend})")
    return name


def grouped_mm(a: Fp8Tensor, w: Fp8Tensor, offs: Tensor,
               out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """a [T, K] ("row"), w [E*N, K] ("row", from quantize_expert_weight), offs int32 [E] end
    offsets (offs[-1] == T) -> [T, N] in out_dtype: rows of group e times w[e]^T."""
    E = offs.numel()
    T, K = a.data.shape
    if w.data.shape[0] % E or w.data.shape[1] != K:
        raise ValueError(f"weight data {tuple(w.data.shape)} is not [E*N, {K}] for E = {E}")
    N = w.data.shape[0] // E
    if _resolve(a.data) == "emulated":
        return ref.grouped_mm_reference(a, w, counts_from_offsets(offs), out_dtype)
    out = torch._scaled_grouped_mm(
        a.data, w.data.view(E, N, K).transpose(1, 2), a.scale.view(T), w.scale.view(E, N),
        offs=offs, out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def grouped_wgrad(a: GroupColumns, b: GroupColumns, out_dtype: torch.dtype = torch.bfloat16
                  ) -> Tensor:
    """a [M, T_cap], b [N, T_cap] (same grouping) -> [E, M, N] in out_dtype, out[e] =
    a_e @ b_e^T over the tokens of expert e (zeros for an expert without tokens)."""
    E = a.padded_offsets.numel()
    M, N = a.data.shape[0], b.data.shape[0]
    if _resolve(a.data) == "emulated":
        return ref.grouped_wgrad_reference(a, b, out_dtype)
    out = torch._scaled_grouped_mm(
        a.data, b.data.t(), a.scale.view(E * M), b.scale.view(E * N), offs=a.padded_offsets,
        out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
