"""Triton tile helpers of the fused producer kernels (kernels/swiglu, kernels/rmsnorm): load a
tile, and write it out in the forms asked for, quantising it to block1x128 FP8 in registers.

The quantisation is the format of kernels/fp8/tensor.py: per group, scale = max(amax,
AMAX_FLOOR) / 448 (fp32, correctly rounded division) and data =
e4m3(clamp(x * (1 / scale), -448, 448)), rounded to nearest even.

The scale and the e4m3 cast are kernels/fp8/triton_cast.py's (`fp8_scale`, `fp8_cast`).
INTERPRET (a constexpr flag, True only in Triton's CPU interpreter) is their exact-rounding flag:
the interpreter (triton 3.9) converts fp32 to bf16 by truncation and fp32 to e4m3 wrongly, so under
it values are first rounded to nearest even in fp32 bit arithmetic (triton_cast.py); on a GPU the
hardware conversions run.
"""

import triton
import triton.language as tl

from kernels.fp8.triton_cast import (  # noqa: F401 (re-export)
    bf16_rne, fp8_cast, fp8_inverse, fp8_scale)


@triton.jit
def load_tile(ptr, rows, cols, stride, mask):
    """Elements [rows, cols] of a row-major matrix with row stride `stride`, as fp32 (0 where
    masked)."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to `dtype` (to nearest even, as the GPU converts)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            x = bf16_rne(x)
    return x.to(dtype)


@triton.jit
def store_fp8_rows(v, rows, cols, row_ok, col_ok, data_ptr, stride_data, scale_ptr,
                   stride_scale_r, stride_scale_b, block, INTERPRET: tl.constexpr):
    """Quantises v [BM, 128] fp32 (zero outside row_ok x col_ok): each row of the tile is one
    group, the `block`-th 128-group along K of rows `rows`. Writes data[rows, cols] and
    scale[rows, block] (through strides)."""
    scale = fp8_scale(tl.max(tl.abs(v), axis=1))
    ptrs = data_ptr + rows[:, None].to(tl.int64) * stride_data + cols[None, :]
    tl.store(ptrs, fp8_cast(v, fp8_inverse(scale)[:, None], INTERPRET),
             mask=row_ok[:, None] & col_ok[None, :])
    tl.store(scale_ptr + rows.to(tl.int64) * stride_scale_r + block * stride_scale_b, scale,
             mask=row_ok)


@triton.jit
def store_fp8_columns(v, rows, cols, row_ok, col_ok, data_ptr, stride_data, scale_ptr,
                      stride_scale_r, stride_scale_b, block, INTERPRET: tl.constexpr):
    """Quantises v [128, BN] fp32 (zero outside row_ok x col_ok) as columns: v's transpose, with
    each column of the tile one group, the `block`-th 128-group along the rows. Writes
    data[cols, rows] (data is [K, R]) and scale[cols, block] (through strides)."""
    store_fp8_columns_scaled(v, fp8_scale(tl.max(tl.abs(v), axis=0)), rows, cols, row_ok,
                             col_ok, data_ptr, stride_data, scale_ptr, stride_scale_r,
                             stride_scale_b, block, INTERPRET)


@triton.jit
def store_fp8_columns_scaled(v, scale, rows, cols, row_ok, col_ok, data_ptr, stride_data,
                             scale_ptr, stride_scale_r, stride_scale_b, block,
                             INTERPRET: tl.constexpr):
    """store_fp8_columns with the groups' scales [BN] given: v [BM, BN] may be any run of rows
    of group `block` (the caller found the amax over all of its 128 rows)."""
    # Element (i, j) of the tile goes to data[cols[j], rows[i]]; the compiler picks the
    # register layout that makes these stores contiguous along the rows.
    ptrs = data_ptr + cols[None, :].to(tl.int64) * stride_data + rows[:, None]
    tl.store(ptrs, fp8_cast(v, fp8_inverse(scale)[None, :], INTERPRET),
             mask=row_ok[:, None] & col_ok[None, :])
    tl.store(scale_ptr + cols.to(tl.int64) * stride_scale_r + block * stride_scale_b, scale,
             mask=col_ok)


@triton.jit
def emit_tile(v, rows, cols, row_ok, col_ok, out_ptr, stride_out,
              rd_ptr, stride_rd, rs_ptr, stride_rs_r, stride_rs_b, rows_block,
              cd_ptr, stride_cd, cs_ptr, stride_cs_r, stride_cs_b, columns_block,
              EMIT_OUT: tl.constexpr, EMIT_ROWS: tl.constexpr, EMIT_COLUMNS: tl.constexpr,
              INTERPRET: tl.constexpr):
    """Writes the tile v [BM, 128] (already rounded to the output dtype) at rows x cols of a
    producer's out [R, K] in the forms asked for (kernels/swiglu/producer.py): out itself; its
    rows group `rows_block` along K; its columns group `columns_block` along R (BM == 128)."""
    if EMIT_OUT:
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :], v,
                 mask=row_ok[:, None] & col_ok[None, :])
    if EMIT_ROWS:
        store_fp8_rows(v.to(tl.float32), rows, cols, row_ok, col_ok, rd_ptr, stride_rd, rs_ptr,
                       stride_rs_r, stride_rs_b, rows_block, INTERPRET)
    if EMIT_COLUMNS:
        store_fp8_columns(v.to(tl.float32), rows, cols, row_ok, col_ok, cd_ptr, stride_cd,
                          cs_ptr, stride_cs_r, stride_cs_b, columns_block, INTERPRET)
