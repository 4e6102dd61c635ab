"""A Triton FP8 GEMM (tensor scaling) whose epilogue can quantise its own output.

  fp8_gemm_triton(a, b, out_dtype, use_fast_accum)   a @ b^T in out_dtype, as fp8_gemm
  fp8_gemm_quantized(a, b, history, ...)             (rows, columns): the Fp8Tensor forms of
      a @ b^T rounded to out_dtype, tensor-scaled with delayed scaling from `history`; equal to
      quantize_rows_and_columns(fp8_gemm_triton(a, b, out_dtype), "tensor", history), without
      writing the high-precision product or reading it back.

Why: where one FP8 linear layer feeds the next directly (linear.fp8_linear_pair), the product
between them is only ever read as FP8. Written in bf16 and quantised by a separate pass it costs a
bf16 write, a bf16 read and two FP8 writes; the quantising epilogue writes only the two FP8 forms.
Delayed scaling makes that possible: the scale comes from earlier amaxes, so the epilogue can cast
before the whole product is known, and records the product's amax (one atomic_max per tile) for
the next step.

The kernel: persistent (one program per SM looping over output tiles in grouped order, so a group
of GROUP_M row tiles reuses b's tiles from L2), TMA tensor descriptors for the operand loads and the
epilogue stores, fp32 accumulation with Hopper wgmma. use_fast_accum=False promotes the FP8 MMA's
partial sums into the fp32 accumulator every K tile (128 products; max_num_imprecise_acc), the
interval DeepSeek-V3 uses; True accumulates in the MMA's reduced precision throughout, as cuBLAS's
fast accumulation. Both give cuBLAS's results to the last digit on the H100. With fast
accumulation the kernel runs at cuBLAS's speed; the promotion's second accumulator makes precise
mode 1.4-1.5x slower than cuBLAS, so fp8_gemm (cuBLAS) stays every recipe's plain GEMM and this
kernel serves where its epilogue saves a pass over the output. Needs SM90 for the wgmma path;
M, N, K multiples of 16 (TMA's 16-byte strides); other shapes take the unfused path (fp8_gemm +
quantize_forms). CPU tensors run the same kernel under TRITON_INTERPRET=1, else the
PyTorch reference.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_support import ROUND_CODES, interpreting, sm_count, use_triton

from .amax_history import AmaxHistory, HistorySlot
from .gemm import fp8_gemm
from .quantize import quantize_forms
from .tensor import FP8_DTYPE, Fp8Tensor, empty_scale
from .triton_cast import fp8_cast, fp8_inverse, history_scale, round_to_code

__all__ = ["fp8_gemm_triton", "fp8_gemm_quantized", "KernelConfig", "CONFIG"]

logger = logging.getLogger(__name__)

TMA_ALIGN = 16  # elements of M, N, K: 16-byte strides of every FP8 operand and output


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters; benchmarks may replace `CONFIG` to tune. Only speed depends on them,
    except block_k, the interval at which precise mode promotes partial sums. Defaults: the
    fastest of benchmarks/fp8_mlp's sweep on the H100 at 16384 x 4096 x 16384."""
    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8  # row tiles per group of the tile order
    stages: int = 3
    warps: int = 8
    programs: int = 0  # persistent programs; 0: one per SM (3 under the interpreter)


CONFIG = KernelConfig()


@triton.jit
def _tile_coords(tile, tiles_per_group, tiles_m, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index `tile` in grouped order."""
    first_m = (tile // tiles_per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    return first_m + tile % group_size, (tile % tiles_per_group) // group_size


@triton.jit(do_not_specialize=["slot"])
def _fp8_gemm_kernel(a_desc, b_desc, out_desc, rows_desc, cols_desc, scale_a_ptr, scale_b_ptr,
                     amax_ptr, n_amax, slot, scale_out_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, QUANTIZE: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr, FAST_ACCUM: tl.constexpr,
                     ROUND: tl.constexpr, EXACT: tl.constexpr, AMAX_SLOTS: tl.constexpr):
    """out = a @ b^T * scale_a * scale_b (a [M, K], b [N, K] e4m3), rounded to ROUND's dtype.
    QUANTIZE: instead of storing out, casts it with the history scale (amax_ptr's n_amax slots
    but `slot`, also stored to scale_out_ptr), stores rows [M, N] and/or cols [N, M] (out^T) in
    e4m3 and atomic_max'es out's amax into amax_ptr[slot]."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_per_group = GROUP_M * tl.cdiv(N, BN)
    scale = tl.load(scale_a_ptr) * tl.load(scale_b_ptr)
    if QUANTIZE:
        scale_out = history_scale(amax_ptr, n_amax, slot, AMAX_SLOTS)
        if pid == 0:
            tl.store(scale_out_ptr, scale_out)
        inv_out = fp8_inverse(scale_out)
    # The epilogue takes its tile from its own counter, not the loop's: Triton's pipelining of
    # flattened loops cannot carry one value into both the loop's prologue and its epilogue.
    tile_out = pid - PROGRAMS
    for tile in tl.range(pid, tiles_m * tl.cdiv(N, BN), PROGRAMS, flatten=True):
        pm, pn = _tile_coords(tile, tiles_per_group, tiles_m, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BK)):
            a = a_desc.load([pm * BM, ki * BK])
            b = b_desc.load([pn * BN, ki * BK])
            if FAST_ACCUM:
                acc = tl.dot(a, b.T, acc)
            else:
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BK)
        tile_out += PROGRAMS
        pm, pn = _tile_coords(tile_out, tiles_per_group, tiles_m, GROUP_M)
        out = round_to_code(acc * scale, ROUND, EXACT)
        if QUANTIZE:
            # Tiles past M or N hold zeros (TMA pads loads with 0), which no amax sees.
            tl.atomic_max(amax_ptr + slot, tl.max(tl.max(tl.abs(out), axis=1), axis=0))
            q = fp8_cast(out, inv_out, EXACT)
            if ROWS:
                rows_desc.store([pm * BM, pn * BN], q)
            if COLS:
                cols_desc.store([pn * BN, pm * BM], tl.trans(q))
        else:
            out_desc.store([pm * BM, pn * BN], out.to(out_desc.dtype))


def _check_pair(a: Fp8Tensor, b: Fp8Tensor) -> None:
    if (a.scaling, b.scaling) != ("tensor", "tensor"):
        raise ValueError(f"the Triton FP8 GEMM takes tensor-scaled operands, got a {a.scaling} "
                         f"x b {b.scaling}; fp8_gemm runs the other recipes")
    if a.data.dim() != 2 or b.data.dim() != 2 or a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"the FP8 GEMM computes a [M, K] @ b[N, K]^T; got a "
                         f"{tuple(a.data.shape)}, b {tuple(b.data.shape)}")


def _kernel_runs(a: Fp8Tensor, b: Fp8Tensor) -> bool:
    """The Triton kernel takes these operands: Triton runs for their device, and every extent is
    a multiple of TMA_ALIGN with 16-byte aligned, row-major data."""
    if not use_triton(a.data, "fp8 Triton GEMM", logger):
        return False
    (M, K), N = a.data.shape, b.data.shape[0]
    return (all(n % TMA_ALIGN == 0 and n > 0 for n in (M, N, K))
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (a.data, b.data)))


def _descriptor(t: Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _programs(tiles: int, device: torch.device) -> int:
    if CONFIG.programs:
        n = CONFIG.programs
    elif device.type == "cuda":
        n = sm_count(device)
    else:
        n = 3  # the interpreter: a few programs, each looping over several tiles
    return max(1, min(n, tiles))


def _launch(a: Fp8Tensor, b: Fp8Tensor, out: Tensor | None, rows: Tensor | None,
            cols: Tensor | None, slot: HistorySlot | None, scale_out: Tensor | None,
            round_dtype: torch.dtype, use_fast_accum: bool) -> None:
    """out given: the plain GEMM; else the quantising epilogue into rows and/or cols, with the
    scale of history slot `slot` (written to scale_out)."""
    c = CONFIG
    (M, K), N = a.data.shape, b.data.shape[0]
    a_desc = _descriptor(a.data, [c.block_m, c.block_k])
    b_desc = _descriptor(b.data, [c.block_n, c.block_k])
    # Descriptors a configuration does not use get a_desc: never touched (constexpr branches).
    out_desc = _descriptor(out, [c.block_m, c.block_n]) if out is not None else a_desc
    rows_desc = _descriptor(rows, [c.block_m, c.block_n]) if rows is not None else a_desc
    cols_desc = _descriptor(cols, [c.block_n, c.block_m]) if cols is not None else a_desc
    quantize = out is None
    amaxes = slot.amaxes if quantize else a.scale  # (a.scale: an unused placeholder)
    tiles = triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n)
    programs = _programs(tiles, a.data.device)
    # An fp32 output tile takes twice a bf16 one's shared memory: one operand stage less.
    stages = c.stages - 1 if out is not None and out.element_size() == 4 else c.stages
    _fp8_gemm_kernel[(programs,)](
        a_desc, b_desc, out_desc, rows_desc, cols_desc, a.scale.float(), b.scale.float(),
        amaxes, amaxes.numel(), slot.slot if quantize else -1,
        scale_out if quantize else a.scale, M, N, K,
        BM=c.block_m, BN=c.block_n, BK=c.block_k, GROUP_M=c.group_m, PROGRAMS=programs,
        QUANTIZE=quantize, ROWS=rows is not None, COLS=cols is not None,
        FAST_ACCUM=use_fast_accum, ROUND=ROUND_CODES[round_dtype], EXACT=interpreting(),
        AMAX_SLOTS=triton.next_power_of_2(amaxes.numel()), num_stages=stages, num_warps=c.warps)


def fp8_gemm_triton(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                    use_fast_accum: bool = False) -> Tensor:
    """a @ b^T -> [M, N] in out_dtype (bf16, fp16 or fp32) for tensor-scaled a [M, K], b [N, K].
    Shapes the kernel does not take (module docstring) run fp8_gemm."""
    _check_pair(a, b)
    if out_dtype not in ROUND_CODES:
        raise ValueError(f"out_dtype must be one of {list(ROUND_CODES)}, got {out_dtype}")
    if not _kernel_runs(a, b):
        return fp8_gemm(a, b, out_dtype, use_fast_accum=use_fast_accum)
    out = torch.empty(a.data.shape[0], b.data.shape[0], dtype=out_dtype, device=a.data.device)
    _launch(a, b, out, None, None, None, None, out_dtype, use_fast_accum)
    return out


def fp8_gemm_quantized(a: Fp8Tensor, b: Fp8Tensor, history: AmaxHistory, *,
                       out_dtype: torch.dtype = torch.bfloat16, use_fast_accum: bool = False,
                       rows: bool = True, columns: bool = True
                       ) -> tuple[Fp8Tensor | None, Fp8Tensor | None]:
    """(rows, columns) of p = a @ b^T rounded to out_dtype, tensor-scaled from `history`
    (delayed scaling; p's amax is recorded into it): rows data [M, N] (the forward or dgrad
    operand of p), columns data [N, M] (the operand of p^T, for a weight gradient), each None
    unless asked for. The first quantisation of a history (no earlier amax to take a scale from)
    and shapes the kernel does not take run fp8_gemm_triton / fp8_gemm, then quantise
    (quantize_forms)."""
    _check_pair(a, b)
    if not (rows or columns):
        raise ValueError("fp8_gemm_quantized: ask for rows, columns or both")
    device = a.data.device
    if not _kernel_runs(a, b) or history.is_empty(device):
        p = fp8_gemm_triton(a, b, out_dtype, use_fast_accum=use_fast_accum)
        return quantize_forms(p, "tensor", rows, columns, history)
    (M, _), N = a.data.shape, b.data.shape[0]
    s = history.next_slot(device)
    data_rows = torch.empty(M, N, dtype=FP8_DTYPE, device=device) if rows else None
    data_cols = torch.empty(N, M, dtype=FP8_DTYPE, device=device) if columns else None
    scale = empty_scale("tensor", M, N, device)  # the kernel writes the scale it cast with
    _launch(a, b, None, data_rows, data_cols, s, scale, out_dtype, use_fast_accum)
    return (Fp8Tensor(data_rows, scale, "tensor") if rows else None,
            Fp8Tensor(data_cols, scale, "tensor") if columns else None)
