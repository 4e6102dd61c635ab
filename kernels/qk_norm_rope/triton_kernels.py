"""Triton kernels: split of the fused qkvg projection, SiLU, q/k RMSNorm and partial NeoX RoPE.

A program owns BLOCK_T tokens of one head: it reads the head's [q; k; v; g] rows of those tokens
(4*D contiguous elements each) once and writes q, k, v, gate as contiguous [N, H, D] tensors
(N = s*b tokens), so the attention that follows reads unit-stride rows.

Each row of q and k is handled as three column ranges, because rotate-half pairs column j with
column j + ROT/2: the first rotary half [0, HALF), the second [HALF, ROT) and the pass-through
[ROT, D). Ranges are padded to powers of two and masked.

Numerics follow the unfused PyTorch path (reference.py): math in fp32, and the result of every
op that PyTorch runs in the input's dtype is rounded to it (`round_to`), so bf16 outputs equal the
model path's up to reduction order. The backward computes in fp32 and rounds once at the end.
"""

import triton
import triton.language as tl

from kernels.fp8.triton_cast import round_to_code


@triton.jit
def round_to(x, ROUND: tl.constexpr):
    """fp32 x rounded to nearest-even in the storage dtype and back to fp32: what an op in that
    dtype returns (ROUND codes: kernels/triton_support.py ROUND_CODES). bf16 by bit arithmetic on
    every backend, because Triton's CPU interpreter truncates in casts."""
    return round_to_code(x, ROUND, True)


@triton.jit
def _load(ptr, rows, cols, mask):
    """[BLOCK_T, n] fp32 tile: row offsets `rows` (int64) plus columns `cols`, zero outside."""
    return tl.load(ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, rows, cols, x, mask):
    tl.store(ptr + rows[:, None] + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows(pid_t, BLOCK_T: tl.constexpr, N, B, stride_s, stride_b, stride_cs, stride_cb):
    """Tokens t = s*B + b of this block: validity, input row offsets and cos/sin row offsets."""
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < N
    si = (t // B).to(tl.int64)
    bi = (t % B).to(tl.int64)
    return t.to(tl.int64), valid, si * stride_s + bi * stride_b, si * stride_cs + bi * stride_cb


@triton.jit
def _load2(ptr, rows, valid, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The two rotary halves [0, HALF) and [HALF, 2*HALF) of rows `rows`: fp32, zero outside."""
    c1 = tl.arange(0, BLOCK_HALF)
    m1 = valid[:, None] & (c1 < HALF)[None, :]
    return _load(ptr, rows, c1, m1), _load(ptr, rows, HALF + c1, m1)


@triton.jit
def _load3(ptr, rows, valid, D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
           BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """The two rotary halves and the pass-through range [ROT, D) of rows `rows`."""
    a1, a2 = _load2(ptr, rows, valid, HALF, BLOCK_HALF)
    cp = ROT + tl.arange(0, BLOCK_PASS)
    return a1, a2, _load(ptr, rows, cp, valid[:, None] & (cp < D)[None, :])


@triton.jit
def _store3(ptr, rows, valid, a1, a2, ap, D: tl.constexpr, HALF: tl.constexpr,
            ROT: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Stores what _load3 loads, in ptr's dtype."""
    c1 = tl.arange(0, BLOCK_HALF)
    cp = ROT + tl.arange(0, BLOCK_PASS)
    m1 = valid[:, None] & (c1 < HALF)[None, :]
    _store(ptr, rows, c1, a1, m1)
    _store(ptr, rows, HALF + c1, a2, m1)
    _store(ptr, rows, cp, ap, valid[:, None] & (cp < D)[None, :])


@triton.jit
def _weights(w_ptr, D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
             BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """A [D] weight as three [1, n] fp32 rows."""
    zero = tl.zeros([1], dtype=tl.int64)
    return _load3(w_ptr, zero, zero == 0, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)


@triton.jit
def _norm_rope_fwd(x_ptr, x_rows, w_ptr, cos_ptr, sin_ptr, c_rows, valid, eps,
                   D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, SILU: tl.constexpr,
                   ROUND: tl.constexpr):
    """One of q, k for a block of tokens, in the three column ranges."""
    x1, x2, xp = _load3(x_ptr, x_rows, valid, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    if SILU:
        x1 = round_to(x1 * tl.sigmoid(x1), ROUND)
        x2 = round_to(x2 * tl.sigmoid(x2), ROUND)
        xp = round_to(xp * tl.sigmoid(xp), ROUND)
    ss = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(xp * xp, 1)
    r = tl.math.rsqrt(ss / D + eps)[:, None]
    w1, w2, wp = _weights(w_ptr, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    y1 = round_to(w1 * round_to(x1 * r, ROUND), ROUND)
    y2 = round_to(w2 * round_to(x2 * r, ROUND), ROUND)
    yp = round_to(wp * round_to(xp * r, ROUND), ROUND)
    cos1, cos2 = _load2(cos_ptr, c_rows, valid, HALF, BLOCK_HALF)
    sin1, sin2 = _load2(sin_ptr, c_rows, valid, HALF, BLOCK_HALF)
    o1 = round_to(round_to(y1 * cos1, ROUND) + round_to(-y2 * sin1, ROUND), ROUND)
    o2 = round_to(round_to(y2 * cos2, ROUND) + round_to(y1 * sin2, ROUND), ROUND)
    return o1, o2, yp


@triton.jit
def _norm_rope_bwd(x_ptr, x_rows, g_ptr, g_rows, w_ptr, cos_ptr, sin_ptr, c_rows, valid, eps,
                   D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, SILU: tl.constexpr,
                   ROUND: tl.constexpr):
    """Gradients of one of q, k: d(raw input) in the three column ranges and this block's
    contribution to d(weight) in the same ranges (fp32, summed over its tokens).

    Forward per row: x = silu(x0)?; n = x * r, r = rsqrt(mean(x^2) + eps); y = w * n;
    o = y * cos + rotate_half(y) * sin on the rotary dims, o = y on the rest."""
    x1, x2, xp = _load3(x_ptr, x_rows, valid, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    if SILU:
        s1, s2, sp = tl.sigmoid(x1), tl.sigmoid(x2), tl.sigmoid(xp)
        x01, x02, x0p = x1, x2, xp
        x1 = round_to(x1 * s1, ROUND)
        x2 = round_to(x2 * s2, ROUND)
        xp = round_to(xp * sp, ROUND)
    ss = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(xp * xp, 1)
    r = tl.where(valid, tl.math.rsqrt(ss / D + eps), 0.0)[:, None]
    n1, n2, np_ = x1 * r, x2 * r, xp * r
    # d(rope)^T: dy = g * cos - rotate_half(g * sin)
    g1, g2, gp = _load3(g_ptr, g_rows, valid, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    cos1, cos2 = _load2(cos_ptr, c_rows, valid, HALF, BLOCK_HALF)
    sin1, sin2 = _load2(sin_ptr, c_rows, valid, HALF, BLOCK_HALF)
    gy1 = g1 * cos1 + g2 * sin2
    gy2 = g2 * cos2 - g1 * sin1
    # the weight multiplies the normalised values as rounded to the input dtype
    dw1 = tl.sum(gy1 * round_to(n1, ROUND), 0)
    dw2 = tl.sum(gy2 * round_to(n2, ROUND), 0)
    dwp = tl.sum(gp * round_to(np_, ROUND), 0)
    w1, w2, wp = _weights(w_ptr, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    gn1, gn2, gnp = gy1 * w1, gy2 * w2, gp * wp
    mean_gn_n = ((tl.sum(gn1 * n1, 1) + tl.sum(gn2 * n2, 1) + tl.sum(gnp * np_, 1)) / D)[:, None]
    dx1 = r * (gn1 - n1 * mean_gn_n)
    dx2 = r * (gn2 - n2 * mean_gn_n)
    dxp = r * (gnp - np_ * mean_gn_n)
    if SILU:  # silu'(x) = s * (1 + x * (1 - s))
        dx1 = dx1 * s1 * (1.0 + x01 * (1.0 - s1))
        dx2 = dx2 * s2 * (1.0 + x02 * (1.0 - s2))
        dxp = dxp * sp * (1.0 + x0p * (1.0 - sp))
    return dx1, dx2, dxp, dw1, dw2, dwp


@triton.jit
def split_norm_rope_fwd_kernel(
        x_ptr, qw_ptr, kw_ptr, qcos_ptr, qsin_ptr, kcos_ptr, ksin_ptr,
        q_ptr, k_ptr, v_ptr, g_ptr,
        N, B, H, stride_s, stride_b, stride_qcs, stride_qcb, stride_kcs, stride_kcb, eps,
        D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
        SILU: tl.constexpr, ROUND: tl.constexpr):
    """Grid (cdiv(N, BLOCK_T), H). x: [s, b, H*4*D] through (stride_s, stride_b, 1); cos/sin
    tables [s, b, ROT] in the input dtype through their strides (0 where broadcast);
    q, k, v, g: contiguous [N, H, D]."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t, valid, x_rows, qc_rows = _rows(pid_t, BLOCK_T, N, B, stride_s, stride_b, stride_qcs,
                                      stride_qcb)
    kc_rows = (t // B) * stride_kcs + (t % B) * stride_kcb
    x_rows += h * 4 * D
    o_rows = (t * H + h) * D
    o1, o2, op = _norm_rope_fwd(x_ptr, x_rows, qw_ptr, qcos_ptr, qsin_ptr, qc_rows, valid, eps,
                                D, HALF, ROT, BLOCK_HALF, BLOCK_PASS, SILU, ROUND)
    _store3(q_ptr, o_rows, valid, o1, o2, op, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    o1, o2, op = _norm_rope_fwd(x_ptr, x_rows + D, kw_ptr, kcos_ptr, ksin_ptr, kc_rows, valid,
                                eps, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS, SILU, ROUND)
    _store3(k_ptr, o_rows, valid, o1, o2, op, D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
    cd = tl.arange(0, BLOCK_D)
    md = valid[:, None] & (cd < D)[None, :]
    v = _load(x_ptr, x_rows + 2 * D, cd, md)
    if SILU:
        v = round_to(v * tl.sigmoid(v), ROUND)
    _store(v_ptr, o_rows, cd, v, md)
    _store(g_ptr, o_rows, cd, _load(x_ptr, x_rows + 3 * D, cd, md), md)


@triton.jit
def split_norm_rope_bwd_kernel(
        x_ptr, qw_ptr, kw_ptr, qcos_ptr, qsin_ptr, kcos_ptr, ksin_ptr,
        dq_ptr, dk_ptr, dv_ptr, dg_ptr, dx_ptr, dw_ptr,
        N, B, H, ITERS, stride_s, stride_b, stride_qcs, stride_qcb, stride_kcs, stride_kcb, eps,
        D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
        SILU: tl.constexpr, ROUND: tl.constexpr):
    """Grid (P, H): program p sweeps token blocks p*ITERS ... (p+1)*ITERS - 1 of head h.
    dq, dk, dv, dg: contiguous [N, H, D]; dx: contiguous [N, H*4*D] (the gradient of x);
    dw: fp32 [2, P*H, D] partial weight gradients of q and k (the caller sums dim 1)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    cd = tl.arange(0, BLOCK_D)
    qacc1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    qacc2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    qaccp = tl.zeros([BLOCK_PASS], dtype=tl.float32)
    kacc1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    kacc2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    kaccp = tl.zeros([BLOCK_PASS], dtype=tl.float32)
    for it in range(ITERS):
        t, valid, x_rows, qc_rows = _rows(pid * ITERS + it, BLOCK_T, N, B, stride_s, stride_b,
                                          stride_qcs, stride_qcb)
        kc_rows = (t // B) * stride_kcs + (t % B) * stride_kcb
        x_rows += h * 4 * D
        g_rows = (t * H + h) * D
        dx_rows = t * (H * 4 * D) + h * 4 * D
        dx1, dx2, dxp, dw1, dw2, dwp = _norm_rope_bwd(
            x_ptr, x_rows, dq_ptr, g_rows, qw_ptr, qcos_ptr, qsin_ptr, qc_rows, valid, eps,
            D, HALF, ROT, BLOCK_HALF, BLOCK_PASS, SILU, ROUND)
        _store3(dx_ptr, dx_rows, valid, round_to(dx1, ROUND), round_to(dx2, ROUND),
                round_to(dxp, ROUND), D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
        qacc1 += dw1
        qacc2 += dw2
        qaccp += dwp
        dx1, dx2, dxp, dw1, dw2, dwp = _norm_rope_bwd(
            x_ptr, x_rows + D, dk_ptr, g_rows, kw_ptr, kcos_ptr, ksin_ptr, kc_rows, valid, eps,
            D, HALF, ROT, BLOCK_HALF, BLOCK_PASS, SILU, ROUND)
        _store3(dx_ptr, dx_rows + D, valid, round_to(dx1, ROUND), round_to(dx2, ROUND),
                round_to(dxp, ROUND), D, HALF, ROT, BLOCK_HALF, BLOCK_PASS)
        kacc1 += dw1
        kacc2 += dw2
        kaccp += dwp

        md = valid[:, None] & (cd < D)[None, :]
        dv = _load(dv_ptr, g_rows, cd, md)
        if SILU:
            v0 = _load(x_ptr, x_rows + 2 * D, cd, md)
            sv = tl.sigmoid(v0)
            dv = dv * sv * (1.0 + v0 * (1.0 - sv))
        _store(dx_ptr, dx_rows + 2 * D, cd, round_to(dv, ROUND), md)
        _store(dx_ptr, dx_rows + 3 * D, cd, round_to(_load(dg_ptr, g_rows, cd, md), ROUND), md)
    # this program's partial weight gradients: rows pid*H + h of dw[0] (q) and dw[1] (k)
    zero = tl.zeros([1], dtype=tl.int64)
    row = (pid * H + h).to(tl.int64) * D + zero
    k_row = row + (tl.num_programs(0) * H * D).to(tl.int64)
    _store3(dw_ptr, row, zero == 0, qacc1[None, :], qacc2[None, :], qaccp[None, :], D, HALF, ROT,
            BLOCK_HALF, BLOCK_PASS)
    _store3(dw_ptr, k_row, zero == 0, kacc1[None, :], kacc2[None, :], kaccp[None, :], D, HALF,
            ROT, BLOCK_HALF, BLOCK_PASS)
