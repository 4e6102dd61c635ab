"""Triton kernels of RMSNorm with fused block1x128 FP8 emission of y (reference.py has the math).

x [M, d] is read through its row stride in tiles of BLOCK_M rows by 128 columns (one
rows-quantisation group; with BLOCK_M == 128 the tile's rows are one columns-quantisation group).
The forward either computes rstd (a first sweep over the whole row, then a second sweep that
writes; the second reads the rows again from cache) or takes a saved rstd and is a single pass;
the backward sweeps twice the same way (the row sum of dn * x_hat, then dx and the partial
dweight). Math in fp32.
"""

import triton
import triton.language as tl

from kernels.swiglu.triton_fp8 import emit_tile, load_tile, round_to

GROUP = tl.constexpr(128)  # kernels/fp8/tensor.py BLOCK


@triton.jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, rstd_ptr, y_ptr, rd_ptr, rs_ptr, cd_ptr, cs_ptr, M, D,
                        eps, chunks, stride_x, stride_y, stride_rd, stride_rs_r, stride_rs_b,
                        stride_cd, stride_cs_r, stride_cs_b,
                        BLOCK_M: tl.constexpr, REDUCE_BLOCK: tl.constexpr,
                        COMPUTE_RSTD: tl.constexpr, EMIT_OUT: tl.constexpr,
                        EMIT_ROWS: tl.constexpr, EMIT_COLUMNS: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(D, 128 * chunks)): a program writes `chunks` 128-column
    blocks of its rows. COMPUTE_RSTD (grid dim 1 == 1) computes rstd [M] fp32 (sweeping the rows
    REDUCE_BLOCK columns at a time) and stores it, else reads it. Writes y [M, D] (y_ptr's
    dtype: also the dtype the FP8 forms round through), its rows (data [M, D], scale
    [M, cdiv(D, 128)]), its columns (data [D, M], scale [D, cdiv(M, 128)]), as asked."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if COMPUTE_RSTD:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, D, REDUCE_BLOCK):
            cols = c0 + tl.arange(0, REDUCE_BLOCK)
            x = load_tile(x_ptr, rows, cols, stride_x, row_ok[:, None] & (cols < D)[None, :])
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.math.rsqrt(sum_sq / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    else:
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    for i in range(0, chunks):
        block = pid_d * chunks + i
        cols = block * GROUP + tl.arange(0, GROUP)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = load_tile(x_ptr, rows, cols, stride_x, mask)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        n = round_to(x * rstd[:, None], x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        emit_tile(round_to(w[None, :] * n, y_ptr.dtype.element_ty, INTERPRET), rows, cols,
                  row_ok, col_ok, y_ptr, stride_y, rd_ptr, stride_rd, rs_ptr, stride_rs_r,
                  stride_rs_b, block, cd_ptr, stride_cd, cs_ptr, stride_cs_r, stride_cs_b, pid_m,
                  EMIT_OUT, EMIT_ROWS, EMIT_COLUMNS, INTERPRET)


@triton.jit
def _bwd_tiles(dy_ptr, x_ptr, w_ptr, rows, row_ok, c0, D, stride_dy, stride_x,
               BLOCK_D: tl.constexpr):
    """Columns [c0, c0 + BLOCK_D) of the backward's inputs: cols, col_ok, dy, x, w (fp32)."""
    cols = c0 + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    dy = load_tile(dy_ptr, rows, cols, stride_dy, mask)
    x = load_tile(x_ptr, rows, cols, stride_x, mask)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return cols, col_ok, dy, x, w


@triton.jit
def rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D, stride_dy,
                        stride_x, stride_dx, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M),). Writes dx [M, D] (dx_ptr's dtype) and this program's partial
    dweight, row pid of dw [grid, D] fp32 (summed over the grid by the caller). Both sweeps take
    BLOCK_D columns at a time."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    dot = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_d dn * x
    for c0 in range(0, D, BLOCK_D):
        cols, col_ok, dy, x, w = _bwd_tiles(dy_ptr, x_ptr, w_ptr, rows, row_ok, c0, D,
                                            stride_dy, stride_x, BLOCK_D)
        dot += tl.sum(dy * w[None, :] * x, axis=1)
    mean_dn_xhat = dot * rstd / D  # mean(dn * x_hat)
    for c0 in range(0, D, BLOCK_D):
        cols, col_ok, dy, x, w = _bwd_tiles(dy_ptr, x_ptr, w_ptr, rows, row_ok, c0, D,
                                            stride_dy, stride_x, BLOCK_D)
        x_hat = x * rstd[:, None]
        dx = rstd[:, None] * (dy * w[None, :] - x_hat * mean_dn_xhat[:, None])
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dx + cols[None, :],
                 round_to(dx, dx_ptr.dtype.element_ty, INTERPRET),
                 mask=row_ok[:, None] & col_ok[None, :])
        n = round_to(x_hat, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        tl.store(dw_ptr + pid.to(tl.int64) * D + cols, tl.sum(dy * n, axis=0), mask=col_ok)
