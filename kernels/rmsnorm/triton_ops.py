"""Launchers of the Triton RMSNorm kernels.

`rms_norm_forward_triton` / `rms_norm_backward_triton` have the contracts of the dispatcher's
`rms_norm_forward` / `rms_norm_backward`. The `launch_*` functions write into caller-given
outputs, which lets tests poison every output before a run.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
import triton
from torch import Tensor

from kernels.fp8.tensor import BLOCK, Fp8Tensor
from kernels.swiglu.producer import Emitted, empty_block1x128, fp8_launch_args, parse_emit
from kernels.triton_support import interpreting

from . import triton_kernels as K


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters; benchmarks may replace `CONFIG` to tune; results do not depend on it.
    Emitting columns fixes the tile at 128 rows (one quantisation group along M)."""
    block_m: int = 16  # rows per program of the forward without columns
    warps: int = 4
    columns_warps: int = 8  # for the 128 x 128 tiles
    # Columns per step of the forward's rstd sweep: wider steps keep more bytes in flight than
    # the 128-column steps that write (one FP8 group each).
    reduce_block: int = 512
    bwd_block_m: int = 16  # rows per backward program (one partial dweight row each)
    bwd_block_d: int = 256  # columns per step of both backward sweeps
    bwd_warps: int = 4


CONFIG = KernelConfig()


def out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """y's dtype: weight * (normalised x in x's dtype) promotes as in PyTorch."""
    return torch.promote_types(x.dtype, weight.dtype)


def check_inputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, d] with a unit last stride, weight [d] contiguous (copied if not)."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be [M, d] and weight [d], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    return (x if x.stride(1) == 1 else x.contiguous()), weight.contiguous()


def _step(width: int, D: int) -> int:
    """A sweep step of `width` columns, no wider than D rounded up to a power of two."""
    return min(width, max(BLOCK, triton.next_power_of_2(D)))


def launch_forward(x: Tensor, weight: Tensor, eps: float, rstd: Tensor, compute_rstd: bool,
                   y: Optional[Tensor], rows: Optional[Fp8Tensor],
                   columns: Optional[Fp8Tensor]) -> None:
    """Writes y [M, d] (unit last stride, dtype out_dtype), rows (block1x128 of y) and columns
    (block1x128 of y^T [d, M]), each if given; rstd [M] fp32 is written if compute_rstd, else
    read. A forward that must compute rstd and emit columns takes two launches (a columns group
    spans 128 rows, more than one program can hold whole)."""
    M, D = x.shape
    if M == 0:
        return
    dummy_y = y
    if y is None:
        dtype = out_dtype(x, weight)
        dummy_y = x if x.dtype == dtype else weight if weight.dtype == dtype else \
            x.new_empty(1, dtype=dtype)  # its dtype is the rounding the FP8 forms see
    if compute_rstd and columns is not None:
        launch_forward(x, weight, eps, rstd, True, y, rows, None)
        launch_forward(x, weight, eps, rstd, False, None, None, columns)
        return
    if compute_rstd:  # one program sweeps whole rows: rstd, then its 128-column blocks
        writes = y is not None or rows is not None
        block_m, warps, chunks = CONFIG.block_m, CONFIG.warps, triton.cdiv(D, BLOCK) * writes
        grid = (triton.cdiv(M, block_m), 1)
    else:  # one program per 128-column block
        block_m, warps, chunks = ((BLOCK, CONFIG.columns_warps, 1) if columns is not None else
                                  (CONFIG.block_m, CONFIG.warps, 1))
        grid = (triton.cdiv(M, block_m), triton.cdiv(D, BLOCK))
    rd, rs, *r_strides = fp8_launch_args(rows, x)
    cd, cs, *c_strides = fp8_launch_args(columns, x)
    K.rms_norm_fwd_kernel[grid](
        x, weight, rstd, dummy_y, rd, rs, cd, cs, M, D, eps, chunks, x.stride(0),
        0 if y is None else y.stride(0), *r_strides, *c_strides, BLOCK_M=block_m,
        REDUCE_BLOCK=_step(CONFIG.reduce_block, D), COMPUTE_RSTD=compute_rstd,
        EMIT_OUT=y is not None, EMIT_ROWS=rows is not None, EMIT_COLUMNS=columns is not None,
        INTERPRET=interpreting(), num_warps=warps)


def launch_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dx: Tensor,
                    dw_partial: Tensor) -> None:
    """Writes dx [M, d] (unit last stride) and dw_partial [cdiv(M, bwd_block_m), d] fp32
    (contiguous; its sum over dim 0 is dweight). grad_y has a unit last stride."""
    M, D = x.shape
    if M == 0:
        return
    K.rms_norm_bwd_kernel[(triton.cdiv(M, CONFIG.bwd_block_m),)](
        grad_y, x, weight, rstd, dx, dw_partial, M, D, grad_y.stride(0), x.stride(0),
        dx.stride(0), BLOCK_M=CONFIG.bwd_block_m,
        BLOCK_D=_step(CONFIG.bwd_block_d, D), INTERPRET=interpreting(),
        num_warps=CONFIG.bwd_warps)


def rms_norm_forward_triton(x: Tensor, weight: Tensor, eps: float = 1e-6,
                            emit: Iterable[str] = ("out",), rstd: Optional[Tensor] = None
                            ) -> tuple[Emitted, Tensor]:
    wanted = parse_emit(emit)
    x, weight = check_inputs(x, weight)
    M, D = x.shape
    compute_rstd = rstd is None
    if compute_rstd:
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    elif rstd.shape != (M,) or rstd.dtype != torch.float32:
        raise ValueError(f"rstd must be [M] = [{M}] fp32, got {tuple(rstd.shape)} {rstd.dtype}")
    result = Emitted(x.new_empty(M, D, dtype=out_dtype(x, weight)) if "out" in wanted else None,
                     empty_block1x128(M, D, x.device) if "rows" in wanted else None,
                     empty_block1x128(D, M, x.device) if "columns" in wanted else None)
    launch_forward(x, weight, eps, rstd.contiguous(), compute_rstd, *result)
    return result, rstd


def rms_norm_backward_triton(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
                             ) -> tuple[Tensor, Tensor]:
    x, weight = check_inputs(x, weight)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must be [M, d] = {list(x.shape)}, got {tuple(grad_y.shape)}")
    if grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous()
    M, D = x.shape
    dx = torch.empty_like(x)
    dw_partial = torch.empty(triton.cdiv(M, CONFIG.bwd_block_m), D, dtype=torch.float32,
                             device=x.device)
    launch_backward(grad_y, x, weight, rstd.contiguous(), dx, dw_partial)
    return dx, dw_partial.sum(0).to(weight.dtype)
