"""Triton kernels of SwiGLU (out = silu(gate) * up * p) with fused block1x128 FP8 emission.

h [M, 2F] is read through its row stride (gate = columns [0, F), up = [F, 2F)). Tiles are 128
columns of F wide (one rows-quantisation group); whenever columns are emitted a program covers
128 rows (one columns-quantisation group), the launcher ensures it. Math in fp32 (reference.py
has the formulas); outputs are rounded to h's dtype, and the FP8 forms quantise those rounded
values.
"""

import triton
import triton.language as tl

from .triton_fp8 import (emit_tile, fp8_scale, load_tile, round_to,
                          store_fp8_columns_scaled)

GROUP = tl.constexpr(128)  # kernels/fp8/tensor.py BLOCK


@triton.jit
def swiglu_fwd_kernel(h_ptr, p_ptr, out_ptr, rd_ptr, rs_ptr, cd_ptr, cs_ptr, M, F,
                      stride_h, stride_out, stride_rd, stride_rs_r, stride_rs_b,
                      stride_cd, stride_cs_r, stride_cs_b,
                      BLOCK_M: tl.constexpr, HAS_PROBS: tl.constexpr, EMIT_OUT: tl.constexpr,
                      EMIT_ROWS: tl.constexpr, EMIT_COLUMNS: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(F, 128)). Writes out [M, F], its rows (data [M, F], scale
    [M, cdiv(F, 128)]) and its columns (data [F, M], scale [F, cdiv(M, 128)]) as asked."""
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_f * GROUP + tl.arange(0, GROUP)
    row_ok = rows < M
    col_ok = cols < F
    mask = row_ok[:, None] & col_ok[None, :]
    gate = load_tile(h_ptr, rows, cols, stride_h, mask)
    up = load_tile(h_ptr + F, rows, cols, stride_h, mask)
    out = gate * tl.sigmoid(gate) * up
    if HAS_PROBS:
        p = tl.load(p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        out = out * p[:, None]
    emit_tile(round_to(out, h_ptr.dtype.element_ty, INTERPRET), rows, cols, row_ok, col_ok,
              out_ptr, stride_out, rd_ptr, stride_rd, rs_ptr, stride_rs_r, stride_rs_b, pid_f,
              cd_ptr, stride_cd, cs_ptr, stride_cs_r, stride_cs_b, pid_m,
              EMIT_OUT, EMIT_ROWS, EMIT_COLUMNS, INTERPRET)


@triton.jit
def _grads(go_ptr, h_ptr, p_ptr, rows, row_ok, cols, col_ok, F, stride_go, stride_h,
           SLAB: tl.constexpr, HAS_PROBS: tl.constexpr, INTERPRET: tl.constexpr):
    """grad_up, grad_gate [SLAB, 128] (rounded to h's dtype) and the partial grad_p [SLAB]
    (zeros without probs) of rows x cols."""
    mask = row_ok[:, None] & col_ok[None, :]
    go = load_tile(go_ptr, rows, cols, stride_go, mask)
    gate = load_tile(h_ptr, rows, cols, stride_h, mask)
    up = load_tile(h_ptr + F, rows, cols, stride_h, mask)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = up * sig * (1 + gate * (1 - sig))  # d out / d gate without grad_out and p
    if HAS_PROBS:
        grad_p = tl.sum(go * silu * up, axis=1)
        go = go * tl.load(p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        grad_p = tl.zeros([SLAB], dtype=tl.float32)
    dtype = h_ptr.dtype.element_ty
    return round_to(go * silu, dtype, INTERPRET), round_to(go * d_gate, dtype, INTERPRET), grad_p


@triton.jit
def _column_amax(go_ptr, h_ptr, p_ptr, rows, row_ok, cols, col_ok, F, stride_go, stride_h,
                 SLAB: tl.constexpr, HAS_PROBS: tl.constexpr, INTERPRET: tl.constexpr):
    """Column-wise amax [128] of grad_up and grad_gate over the slab's rows."""
    grad_up, grad_gate, _ = _grads(go_ptr, h_ptr, p_ptr, rows, row_ok, cols, col_ok, F,
                                   stride_go, stride_h, SLAB, HAS_PROBS, INTERPRET)
    return (tl.max(tl.abs(grad_up.to(tl.float32)), axis=0),
            tl.max(tl.abs(grad_gate.to(tl.float32)), axis=0))


@triton.jit
def _emit_slab(go_ptr, h_ptr, p_ptr, gh_ptr, rd_ptr, rs_ptr, cd_ptr, cs_ptr, rows, row_ok,
               cols, col_ok, F, fb, pid_m, scale_up, scale_gate, stride_go, stride_h, stride_gh,
               stride_rd, stride_rs_r, stride_rs_b, stride_cd, stride_cs_r, stride_cs_b,
               SLAB: tl.constexpr, HAS_PROBS: tl.constexpr, EMIT_OUT: tl.constexpr,
               EMIT_ROWS: tl.constexpr, EMIT_COLUMNS: tl.constexpr, INTERPRET: tl.constexpr):
    """Writes the slab's grad_h tiles (up's at columns F + cols, gate's at cols) in the forms
    asked for (columns with the given scales); returns its partial grad_p [SLAB]."""
    grad_up, grad_gate, grad_p = _grads(go_ptr, h_ptr, p_ptr, rows, row_ok, cols, col_ok, F,
                                        stride_go, stride_h, SLAB, HAS_PROBS, INTERPRET)
    up_block = F // GROUP  # rows group index of up's first columns (F % 128 == 0 when used)
    emit_tile(grad_up, rows, cols + F, row_ok, col_ok, gh_ptr, stride_gh, rd_ptr, stride_rd,
              rs_ptr, stride_rs_r, stride_rs_b, up_block + fb, cd_ptr, stride_cd, cs_ptr,
              stride_cs_r, stride_cs_b, pid_m, EMIT_OUT, EMIT_ROWS, False, INTERPRET)
    emit_tile(grad_gate, rows, cols, row_ok, col_ok, gh_ptr, stride_gh, rd_ptr, stride_rd,
              rs_ptr, stride_rs_r, stride_rs_b, fb, cd_ptr, stride_cd, cs_ptr, stride_cs_r,
              stride_cs_b, pid_m, EMIT_OUT, EMIT_ROWS, False, INTERPRET)
    if EMIT_COLUMNS:
        store_fp8_columns_scaled(grad_up.to(tl.float32), scale_up, rows, cols + F, row_ok,
                                 col_ok, cd_ptr, stride_cd, cs_ptr, stride_cs_r, stride_cs_b,
                                 pid_m, INTERPRET)
        store_fp8_columns_scaled(grad_gate.to(tl.float32), scale_gate, rows, cols, row_ok,
                                 col_ok, cd_ptr, stride_cd, cs_ptr, stride_cs_r, stride_cs_b,
                                 pid_m, INTERPRET)
    return grad_p


@triton.jit
def swiglu_bwd_kernel(go_ptr, h_ptr, p_ptr, gh_ptr, gp_ptr, rd_ptr, rs_ptr, cd_ptr, cs_ptr, M, F,
                      slabs, stride_go, stride_h, stride_gh, stride_rd, stride_rs_r,
                      stride_rs_b, stride_cd, stride_cs_r, stride_cs_b,
                      SLAB: tl.constexpr, HAS_PROBS: tl.constexpr, EMIT_OUT: tl.constexpr,
                      EMIT_ROWS: tl.constexpr, EMIT_COLUMNS: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Grid (cdiv(M, slabs * SLAB),): a program owns `slabs` slabs of SLAB rows and sweeps all
    of F (grad_p sums over F), 128 columns at a time, one slab after the other (a runtime loop,
    so that the compiler does not interleave slabs: one 128 x 128 block of both gradients and
    their inputs does not fit in registers). Writes grad_h [M, 2F], its rows (data [M, 2F],
    scale [M, 2F / 128]; needs F % 128 == 0 so that no group straddles gate and up), its
    columns (data [2F, M], scale [2F, cdiv(M, 128)]; needs slabs * SLAB == 128) as asked, and
    grad_p [M] fp32 when HAS_PROBS (accumulated in place over F).

    Columns need each column's amax over all 128 rows before any of them is quantised: a first
    pass over the slabs finds it, and the second recomputes the gradients (re-reading the inputs
    from cache) and writes everything."""
    row0 = tl.program_id(0) * (slabs * SLAB)
    for fb in range(0, tl.cdiv(F, GROUP)):
        cols = fb * GROUP + tl.arange(0, GROUP)
        col_ok = cols < F
        if EMIT_COLUMNS:
            amax_up = tl.zeros([GROUP], dtype=tl.float32)
            amax_gate = tl.zeros([GROUP], dtype=tl.float32)
            for s in range(0, slabs):
                rows = row0 + s * SLAB + tl.arange(0, SLAB)
                up, gate = _column_amax(go_ptr, h_ptr, p_ptr, rows, rows < M, cols, col_ok, F,
                                        stride_go, stride_h, SLAB, HAS_PROBS, INTERPRET)
                amax_up = tl.maximum(amax_up, up)
                amax_gate = tl.maximum(amax_gate, gate)
            scale_up = fp8_scale(amax_up)
            scale_gate = fp8_scale(amax_gate)
        else:
            scale_up = tl.zeros([GROUP], dtype=tl.float32)  # unused
            scale_gate = scale_up
        for s in range(0, slabs):
            rows = row0 + s * SLAB + tl.arange(0, SLAB)
            row_ok = rows < M
            grad_p = _emit_slab(go_ptr, h_ptr, p_ptr, gh_ptr, rd_ptr, rs_ptr, cd_ptr, cs_ptr,
                                rows, row_ok, cols, col_ok, F, fb, row0 // GROUP, scale_up,
                                scale_gate, stride_go, stride_h, stride_gh, stride_rd,
                                stride_rs_r, stride_rs_b, stride_cd, stride_cs_r, stride_cs_b,
                                SLAB, HAS_PROBS, EMIT_OUT, EMIT_ROWS, EMIT_COLUMNS, INTERPRET)
            if HAS_PROBS:
                grad_p += tl.load(gp_ptr + rows, mask=row_ok & (fb > 0), other=0.0)
                tl.store(gp_ptr + rows, grad_p, mask=row_ok)
