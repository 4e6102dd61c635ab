"""Launchers of the Triton SwiGLU kernels.

`swiglu_forward_triton` / `swiglu_backward_triton` have the contracts of the dispatcher's
`swiglu_forward` / `swiglu_backward`. The `launch_*` functions write into caller-given outputs,
which lets tests poison every output before a run.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
import triton
from torch import Tensor

from kernels.fp8.tensor import BLOCK, Fp8Tensor

from . import triton_kernels as K
from kernels.triton_support import interpreting

from .producer import Emitted, empty_block1x128, fp8_launch_args, parse_emit


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters; benchmarks may replace `CONFIG` to tune; results do not depend on it.
    Emitting columns fixes a program's rows at 128 (one quantisation group along M). Register
    budgets (ptxas, sm_90): more than ~32 fp32 elements of each tile per thread spills."""
    block_m: int = 64  # forward: rows per program when no columns are emitted
    warps: int = 4
    columns_warps: int = 8  # forward: for the 128 x 128 tiles
    bwd_slab: int = 32  # backward without columns: rows per slab,
    bwd_slabs: int = 2  # and slabs per program
    bwd_warps: int = 4
    bwd_columns_slab: int = 64  # backward with columns: rows per slab (128 rows per program)
    bwd_columns_warps: int = 8


CONFIG = KernelConfig()


def check_inputs(h: Tensor, probs: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """h [M, 2F] with a unit last stride and probs [M] contiguous (copied if not)."""
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"h must be [M, 2F], got {tuple(h.shape)}")
    if h.stride(1) != 1:
        h = h.contiguous()
    if probs is not None:
        if probs.numel() != h.shape[0]:
            raise ValueError(f"probs must hold one weight per row of h ({h.shape[0]}), got "
                             f"{tuple(probs.shape)}")
        probs = probs.reshape(-1).contiguous()
    return h, probs


def launch_forward(h: Tensor, probs: Optional[Tensor], out: Optional[Tensor],
                   rows: Optional[Fp8Tensor], columns: Optional[Fp8Tensor]) -> None:
    """Writes out [M, F] (unit last stride), rows (block1x128 of out) and columns (block1x128 of
    out^T [F, M]), each if given. h, probs as check_inputs returns them."""
    M, F = h.shape[0], h.shape[1] // 2
    if M == 0 or F == 0:  # e.g. no tokens routed here: nothing to write
        return
    block_m, warps = ((BLOCK, CONFIG.columns_warps) if columns is not None else
                      (CONFIG.block_m, CONFIG.warps))
    rd, rs, *r_strides = fp8_launch_args(rows, h)
    cd, cs, *c_strides = fp8_launch_args(columns, h)
    K.swiglu_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(F, BLOCK))](
        h, h if probs is None else probs, h if out is None else out, rd, rs, cd, cs, M, F,
        h.stride(0), 0 if out is None else out.stride(0), *r_strides, *c_strides,
        BLOCK_M=block_m, HAS_PROBS=probs is not None, EMIT_OUT=out is not None,
        EMIT_ROWS=rows is not None, EMIT_COLUMNS=columns is not None,
        INTERPRET=interpreting(), num_warps=warps)


def launch_backward(grad_out: Tensor, h: Tensor, probs: Optional[Tensor],
                    grad_h: Optional[Tensor], rows: Optional[Fp8Tensor],
                    columns: Optional[Fp8Tensor], grad_probs: Optional[Tensor]) -> None:
    """Writes grad_h [M, 2F] (unit last stride), rows (block1x128 of grad_h; F % 128 == 0),
    columns (block1x128 of grad_h^T [2F, M]), each if given, and grad_probs [M] fp32
    (contiguous) when probs is given. grad_out [M, F] has a unit last stride."""
    M, F = h.shape[0], h.shape[1] // 2
    if rows is not None and F % BLOCK:
        raise ValueError(f"FP8 rows of grad_h need F % {BLOCK} == 0 (a group may not straddle "
                         f"gate and up), got F = {F}")
    if M == 0 or F == 0:
        if grad_probs is not None:
            grad_probs.zero_()
        return
    if columns is not None:  # a program owns one 128-row group, in slabs
        slab, slabs, warps = CONFIG.bwd_columns_slab, BLOCK // CONFIG.bwd_columns_slab, \
            CONFIG.bwd_columns_warps
    else:
        slab, slabs, warps = CONFIG.bwd_slab, CONFIG.bwd_slabs, CONFIG.bwd_warps
    rd, rs, *r_strides = fp8_launch_args(rows, h)
    cd, cs, *c_strides = fp8_launch_args(columns, h)
    K.swiglu_bwd_kernel[(triton.cdiv(M, slab * slabs),)](
        grad_out, h, h if probs is None else probs, h if grad_h is None else grad_h,
        h if grad_probs is None else grad_probs, rd, rs, cd, cs, M, F, slabs,
        grad_out.stride(0), h.stride(0), 0 if grad_h is None else grad_h.stride(0), *r_strides,
        *c_strides,
        SLAB=slab, HAS_PROBS=probs is not None, EMIT_OUT=grad_h is not None,
        EMIT_ROWS=rows is not None, EMIT_COLUMNS=columns is not None,
        INTERPRET=interpreting(), num_warps=warps)


def swiglu_forward_triton(h: Tensor, probs: Optional[Tensor] = None,
                          emit: Iterable[str] = ("out",)) -> Emitted:
    wanted = parse_emit(emit)
    h, probs = check_inputs(h, probs)
    M, F = h.shape[0], h.shape[1] // 2
    result = Emitted(h.new_empty(M, F) if "out" in wanted else None,
                     empty_block1x128(M, F, h.device) if "rows" in wanted else None,
                     empty_block1x128(F, M, h.device) if "columns" in wanted else None)
    launch_forward(h, probs, *result)
    return result


def swiglu_backward_triton(grad_out: Tensor, h: Tensor, probs: Optional[Tensor] = None,
                           emit: Iterable[str] = ("out",)) -> tuple[Emitted, Optional[Tensor]]:
    wanted = parse_emit(emit)
    h, probs = check_inputs(h, probs)
    M, F = h.shape[0], h.shape[1] // 2
    if grad_out.shape != (M, F):
        raise ValueError(f"grad_out must be [M, F] = [{M}, {F}], got {tuple(grad_out.shape)}")
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    grads = Emitted(h.new_empty(M, 2 * F) if "out" in wanted else None,
                    empty_block1x128(M, 2 * F, h.device) if "rows" in wanted else None,
                    empty_block1x128(2 * F, M, h.device) if "columns" in wanted else None)
    grad_probs = None if probs is None else torch.empty(M, dtype=torch.float32, device=h.device)
    launch_backward(grad_out, h, probs, *grads, grad_probs)
    return grads, None if grad_probs is None else grad_probs.to(probs.dtype)
