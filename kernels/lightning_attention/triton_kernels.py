"""Triton kernels of lightning attention: chunked forward, backward and decode; one sweep each.

Notation (reference.py has the math): per head h, g = slope[h] * log2(e), so lambda^n = 2^(-g n).
Inputs are [T, B, H, D] (sequence first) read through strides; q, k, v share one set of strides
(slices of a fused QKV projection, or separate tensors of one shape).

Work is cut into *segments*: runs of whole chunks of one sequence (a batch row, or a document of a
packed row), described by a table of int32 rows (row, t_start, t_end, seq, flags). A program owns
one (segment, head, block of the state) and sweeps the segment's chunks in order, keeping its slice
of the fp32 state in registers; no per-chunk state ever reaches memory. When sequences are long and
few, they are cut into several segments for parallelism, and the state entering each segment comes
from two cheap extra launches: `state_increment_kernel` (each segment's own contribution, from a
zero state) and `segment_scan_kernel` (a scan of those over the segments of each sequence).

Dots take bf16 (the inputs' type) operands and accumulate in fp32. FP32_DOT=True upcasts the
operands instead: Triton's CPU interpreter computes bf16 dots wrongly (triton 3.9), so tests on CPU
run with it.
"""

import triton
import triton.language as tl

# Segment table: int32 rows (row, t_start, t_end, seq, flags); flag bits below.
SEG_COLS = 5
FIRST, LAST = 1, 2  # the segment starts / ends its sequence


@triton.jit
def _dot(a, b, dtype: tl.constexpr, FP32_DOT: tl.constexpr):
    """a @ b accumulated in fp32, operands cast to dtype (or fp32 when FP32_DOT)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a.to(dtype), b.to(dtype))


@triton.jit
def _tile(base, t, t_end, stride_t, col0, NCOL: tl.constexpr):
    """Rows t (masked at t_end, zero-filled) and columns [col0, col0 + NCOL) of a [T, D] view."""
    cols = col0 + tl.arange(0, NCOL)
    ptrs = base + t[:, None].to(tl.int64) * stride_t + cols[None, :]
    return tl.load(ptrs, mask=(t < t_end)[:, None], other=0.0)


@triton.jit
def _store_tile(base, x, t, t_end, stride_t, col0, NCOL: tl.constexpr):
    cols = col0 + tl.arange(0, NCOL)
    ptrs = base + t[:, None].to(tl.int64) * stride_t + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(t < t_end)[:, None])


@triton.jit
def _state_ptrs(base, idx, i_h, H, k0, v0, DK: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """Pointers to block [k0:k0+BK, v0:v0+BV] of state [idx, i_h] of a [*, H, DK, DV] tensor."""
    rows = k0 + tl.arange(0, BK)
    cols = v0 + tl.arange(0, BV)
    return base + (idx.to(tl.int64) * H + i_h) * (DK * DV) + rows[:, None] * DV + cols[None, :]


@triton.jit
def _log2_decay(slope, i_h):
    """g = slope[h] * log2(e): lambda^n = 2^(-g n)."""
    return tl.load(slope + i_h).to(tl.float32) * 1.4426950408889634


@triton.jit
def _entering_block(scanned, given, i_s, n, i_h, H, k0, v0, DK: tl.constexpr, DV: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr,
                    HAS_GIVEN: tl.constexpr):
    """A program's [BK, BV] block of the state (or state gradient) it starts its sweep from:
    the scanned value for segment i_s when sequences are cut, else the caller's given value for
    sequence n (initial state / final-state gradient), else zero."""
    if SPLIT:
        X = tl.load(_state_ptrs(scanned, i_s, i_h, H, k0, v0, DK, DV, BK, BV))
    elif HAS_GIVEN:
        X = tl.load(_state_ptrs(given, n, i_h, H, k0, v0, DK, DV, BK, BV))
    else:
        X = tl.zeros([BK, BV], dtype=tl.float32)
    return X


@triton.jit
def _segment(seg, i_s):
    row = tl.load(seg + i_s * 5 + 0)
    t0 = tl.load(seg + i_s * 5 + 1)
    t1 = tl.load(seg + i_s * 5 + 2)
    n = tl.load(seg + i_s * 5 + 3)
    flags = tl.load(seg + i_s * 5 + 4)
    return row, t0, t1, n, flags


@triton.jit
def _decays(slope, i_h, scale, BT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """g (log2 decay per step); the intra-chunk mask scale * lambda^(i-j) for query row i >= key
    row j, else 0, as [i, j] or, TRANSPOSED, as [j, i]; and scale * lambda^(i+1), the weight of the
    state entering a chunk at row i. The scale rides on these small tensors so that no full tile
    is multiplied by it."""
    g = _log2_decay(slope, i_h)
    pos = tl.arange(0, BT)
    if TRANSPOSED:
        diff = pos[None, :] - pos[:, None]
    else:
        diff = pos[:, None] - pos[None, :]
    mask = tl.where(diff >= 0, scale * tl.exp2(-g * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    q_decay = scale * tl.exp2(-g * (pos + 1).to(tl.float32))
    return g, pos, mask, q_decay


@triton.jit
def _k_decay(g, pos, L):
    """lambda^(L-1-j) for the L real rows of a chunk (how much of key j reaches the state leaving
    the chunk); zero on padding rows."""
    return tl.where(pos < L, tl.exp2(-g * tl.maximum(L - 1 - pos, 0).to(tl.float32)), 0.0)


@triton.jit
def fwd_kernel(q, k, v, o, slope, seg, s_in, h0, ht,
               s_t, s_b, s_h, so_t, so_b, so_h, scale, H,
               BT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
               SPLIT: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
               FP32_DOT: tl.constexpr):
    """Output o and final state ht. Grid (DV // BV, H, segments); state block [DK, BV]."""
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, t0, t1, n, flags = _segment(seg, i_s)
    g, pos, mask, q_decay = _decays(slope, i_h, scale, BT, False)
    dtype = q.dtype.element_ty
    v0 = i_v * BV
    S = _entering_block(s_in, h0, i_s, n, i_h, H, 0, v0, DK, DV, DK, BV, SPLIT, HAS_H0)
    off = row.to(tl.int64) * s_b + i_h * s_h
    qb, kb, vb = q + off, k + off, v + off
    ob = o + row.to(tl.int64) * so_b + i_h * so_h
    for c in range(0, tl.cdiv(t1 - t0, BT)):
        t = t0 + c * BT + pos
        L = tl.minimum(t1 - t0 - c * BT, BT)
        bq = _tile(qb, t, t1, s_t, 0, DK)
        bk = _tile(kb, t, t1, s_t, 0, DK)
        bv = _tile(vb, t, t1, s_t, v0, BV)
        attn = _dot(bq, tl.trans(bk), dtype, FP32_DOT) * mask
        out = _dot(attn, bv, dtype, FP32_DOT) + _dot(bq, S, dtype, FP32_DOT) * q_decay[:, None]
        _store_tile(ob, out, t, t1, so_t, v0, BV)
        kd = _k_decay(g, pos, L)
        S = S * tl.exp2(-g * L) + _dot(tl.trans(bk), bv * kd[:, None], dtype, FP32_DOT)
    if STORE_HT:
        if (flags & 2) != 0:
            tl.store(_state_ptrs(ht, n, i_h, H, 0, v0, DK, DV, DK, BV), S)


@triton.jit
def state_increment_kernel(x, y, delta, slope, seg, s_t, s_b, s_h, sy_t, sy_b, sy_h, scale, H,
                           BT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                           FP32_DOT: tl.constexpr):
    """Each segment's own contribution to the state, from a zero start. Grid (NK * NV, H, segs).

    Forward (x = k, y = v): the state leaving the segment, sum_j lambda^(t_end-1-j) k_j^T v_j;
    skipped (zero) on a sequence's last segment, whose leaving state nothing reads.
    Reverse (x = q, y = do): the gradient reaching the state that enters the segment,
    scale * sum_i lambda^(i-t_start+1) q_i^T do_i; skipped on a sequence's first segment.
    """
    i_kv, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = DV // BV
    k0 = (i_kv // NV) * BK
    v0 = (i_kv % NV) * BV
    row, t0, t1, n, flags = _segment(seg, i_s)
    g, pos, mask, q_decay = _decays(slope, i_h, scale, BT, False)
    dtype = x.dtype.element_ty
    xb = x + row.to(tl.int64) * s_b + i_h * s_h
    yb = y + row.to(tl.int64) * sy_b + i_h * sy_h
    n_chunks = tl.cdiv(t1 - t0, BT)
    if REVERSE:
        n_chunks = tl.where((flags & 1) != 0, 0, n_chunks)
    else:
        n_chunks = tl.where((flags & 2) != 0, 0, n_chunks)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - i
        else:
            c = i
        t = t0 + c * BT + pos
        L = tl.minimum(t1 - t0 - c * BT, BT)
        bx = _tile(xb, t, t1, s_t, k0, BK)
        by = _tile(yb, t, t1, sy_t, v0, BV)
        if REVERSE:
            w = q_decay
        else:
            w = _k_decay(g, pos, L)
        acc = acc * tl.exp2(-g * L) + _dot(tl.trans(bx), by * w[:, None], dtype, FP32_DOT)
    tl.store(_state_ptrs(delta, i_s, i_h, H, k0, v0, DK, DV, BK, BV), acc)


@triton.jit
def segment_scan_kernel(delta, out, init, slope, seg, seq_segs, H,
                        DKV: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr,
                        HAS_INIT: tl.constexpr):
    """States at segment boundaries, per sequence. Grid (DKV // BLOCK, H, sequences).

    Forward: out[s] = the state entering segment s (init[n] or zero at the first), and
    state_after(s) = lambda^len(s) * out[s] + delta[s].
    Reverse: out[s] = the gradient of the state leaving segment s (init[n] = d final state, or
    zero, at the last), and grad_entering(s) = lambda^len(s) * out[s] + delta[s].
    """
    i_b, i_h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = _log2_decay(slope, i_h)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    s_first = tl.load(seq_segs + n)
    count = tl.load(seq_segs + n + 1) - s_first
    if HAS_INIT:
        X = tl.load(init + (n.to(tl.int64) * H + i_h) * DKV + offs)
    else:
        X = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, count):
        if REVERSE:
            s = s_first + count - 1 - i
        else:
            s = s_first + i
        base = (s.to(tl.int64) * H + i_h) * DKV + offs
        tl.store(out + base, X)
        length = tl.load(seg + s * 5 + 2) - tl.load(seg + s * 5 + 1)
        X = X * tl.exp2(-g * length) + tl.load(delta + base)


@triton.jit
def _bwd_dq(qb, kb, vb, dob, dqb, s_in, h0, slope, i_k, i_h, i_s, n, t0, t1,
            s_t, sd_t, so_t, scale, H, BT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
            BK: tl.constexpr, SPLIT: tl.constexpr, HAS_H0: tl.constexpr, FP32_DOT: tl.constexpr):
    """dq[:, k-block], sweeping forward with the state rows S[k-block, :] ([BK, DV])."""
    dtype = kb.dtype.element_ty
    g, pos, mask, q_decay = _decays(slope, i_h, scale, BT, False)
    k0 = i_k * BK
    S = _entering_block(s_in, h0, i_s, n, i_h, H, k0, 0, DK, DV, BK, DV, SPLIT, HAS_H0)
    for c in range(0, tl.cdiv(t1 - t0, BT)):
        t = t0 + c * BT + pos
        L = tl.minimum(t1 - t0 - c * BT, BT)
        bk = _tile(kb, t, t1, s_t, k0, BK)
        bv = _tile(vb, t, t1, s_t, 0, DV)
        bdo = _tile(dob, t, t1, sd_t, 0, DV)
        dov = _dot(bdo, tl.trans(bv), dtype, FP32_DOT) * mask  # [i, j] = lambda^(i-j) do_i.v_j
        dq = (_dot(dov, bk, dtype, FP32_DOT)
              + _dot(bdo, tl.trans(S), dtype, FP32_DOT) * q_decay[:, None])
        _store_tile(dqb, dq, t, t1, so_t, k0, BK)
        kd = _k_decay(g, pos, L)
        S = S * tl.exp2(-g * L) + _dot(tl.trans(bk), bv * kd[:, None], dtype, FP32_DOT)


@triton.jit
def _bwd_dk(qb, vb, dob, dkb, r_out, dht, dh0, slope, i_k, i_h, i_s, n, t0, t1, flags,
            s_t, sd_t, so_t, scale, H, BT: tl.constexpr, DK: tl.constexpr,
            DV: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, HAS_DHT: tl.constexpr,
            STORE_DH0: tl.constexpr, FP32_DOT: tl.constexpr):
    """dk[:, k-block] (and d initial state rows), sweeping backward with R[k-block, :], the
    gradient of the state leaving the current chunk."""
    dtype = qb.dtype.element_ty
    g, pos, mask, q_decay = _decays(slope, i_h, scale, BT, True)
    k0 = i_k * BK
    R = _entering_block(r_out, dht, i_s, n, i_h, H, k0, 0, DK, DV, BK, DV, SPLIT, HAS_DHT)
    n_chunks = tl.cdiv(t1 - t0, BT)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = t0 + c * BT + pos
        L = tl.minimum(t1 - t0 - c * BT, BT)
        bq = _tile(qb, t, t1, s_t, k0, BK)
        bv = _tile(vb, t, t1, s_t, 0, DV)
        bdo = _tile(dob, t, t1, sd_t, 0, DV)
        vdo = _dot(bv, tl.trans(bdo), dtype, FP32_DOT) * mask  # [j, i]
        kd = _k_decay(g, pos, L)
        dk = _dot(vdo, bq, dtype, FP32_DOT) + _dot(bv, tl.trans(R), dtype, FP32_DOT) * kd[:, None]
        _store_tile(dkb, dk, t, t1, so_t, k0, BK)
        R = R * tl.exp2(-g * L) + _dot(tl.trans(bq), bdo * q_decay[:, None], dtype, FP32_DOT)
    if STORE_DH0:
        if (flags & 1) != 0:
            tl.store(_state_ptrs(dh0, n, i_h, H, k0, 0, DK, DV, BK, DV), R)


@triton.jit
def _bwd_dv(qb, kb, dob, dvb, r_out, dht, slope, i_v, i_h, i_s, n, t0, t1,
            s_t, sd_t, so_t, scale, H, BT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
            BV: tl.constexpr, SPLIT: tl.constexpr, HAS_DHT: tl.constexpr,
            FP32_DOT: tl.constexpr):
    """dv[:, v-block], sweeping backward with R[:, v-block]."""
    dtype = qb.dtype.element_ty
    g, pos, mask, q_decay = _decays(slope, i_h, scale, BT, True)
    v0 = i_v * BV
    R = _entering_block(r_out, dht, i_s, n, i_h, H, 0, v0, DK, DV, DK, BV, SPLIT, HAS_DHT)
    n_chunks = tl.cdiv(t1 - t0, BT)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = t0 + c * BT + pos
        L = tl.minimum(t1 - t0 - c * BT, BT)
        bq = _tile(qb, t, t1, s_t, 0, DK)
        bk = _tile(kb, t, t1, s_t, 0, DK)
        bdo = _tile(dob, t, t1, sd_t, v0, BV)
        kq = _dot(bk, tl.trans(bq), dtype, FP32_DOT) * mask  # [j, i]
        kd = _k_decay(g, pos, L)
        dv = _dot(kq, bdo, dtype, FP32_DOT) + _dot(bk, R, dtype, FP32_DOT) * kd[:, None]
        _store_tile(dvb, dv, t, t1, so_t, v0, BV)
        R = R * tl.exp2(-g * L) + _dot(tl.trans(bq), bdo * q_decay[:, None], dtype, FP32_DOT)


@triton.jit
def bwd_kernel(q, k, v, do, dq, dk, dv, slope, seg, s_in, h0, r_out, dht, dh0,
               s_t, s_b, s_h, sd_t, sd_b, sd_h, so_t, so_b, so_h, scale, H,
               BT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, SPLIT: tl.constexpr, HAS_H0: tl.constexpr,
               HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, FP32_DOT: tl.constexpr):
    """dq, dk, dv (and d initial state) in one launch. Grid (2 * DK // BK + DV // BV, H, segs):
    programs [0, NK) compute dq k-blocks, [NK, 2 NK) dk k-blocks, the rest dv v-blocks. Siblings
    of one (segment, head) are adjacent in launch order, so they share q, k, v, do through L2."""
    pid, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NK: tl.constexpr = DK // BK
    row, t0, t1, n, flags = _segment(seg, i_s)
    off = row.to(tl.int64) * s_b + i_h * s_h
    off_do = row.to(tl.int64) * sd_b + i_h * sd_h
    off_o = row.to(tl.int64) * so_b + i_h * so_h
    if pid < NK:
        _bwd_dq(q + off, k + off, v + off, do + off_do, dq + off_o, s_in, h0, slope, pid, i_h, i_s,
                n, t0, t1, s_t, sd_t, so_t, scale, H, BT, DK, DV, BK, SPLIT,
                HAS_H0, FP32_DOT)
    elif pid < 2 * NK:
        _bwd_dk(q + off, v + off, do + off_do, dk + off_o, r_out, dht, dh0, slope, pid - NK,
                i_h, i_s, n, t0, t1, flags, s_t, sd_t, so_t, scale, H, BT, DK, DV,
                BK, SPLIT, HAS_DHT, STORE_DH0, FP32_DOT)
    else:
        _bwd_dv(q + off, k + off, do + off_do, dv + off_o, r_out, dht, slope, pid - 2 * NK,
                i_h, i_s, n, t0, t1, s_t, sd_t, so_t, scale, H, BT, DK, DV, BV,
                SPLIT, HAS_DHT, FP32_DOT)


@triton.jit
def decode_kernel(q, k, v, o, slope, state, s_b, s_h, so_b, so_h, scale, H,
                  DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """One token: state = lambda * state + k^T v (in place), o = scale * q state.
    Grid (DV // BV, H, B); q, k, v: [B, H, D] through strides; state [B, H, DK, DV] fp32."""
    i_v, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    v0 = i_v * BV
    g = _log2_decay(slope, i_h)
    off = i_b.to(tl.int64) * s_b + i_h * s_h
    bq = tl.load(q + off + tl.arange(0, DK)).to(tl.float32)
    bk = tl.load(k + off + tl.arange(0, DK)).to(tl.float32)
    bv = tl.load(v + off + v0 + tl.arange(0, BV)).to(tl.float32)
    ptrs = _state_ptrs(state, i_b, i_h, H, 0, v0, DK, DV, DK, BV)
    S = tl.load(ptrs) * tl.exp2(-g) + bk[:, None] * bv[None, :]
    tl.store(ptrs, S)
    out = tl.sum(bq[:, None] * S, axis=0) * scale
    tl.store(o + i_b.to(tl.int64) * so_b + i_h * so_h + v0 + tl.arange(0, BV),
             out.to(o.dtype.element_ty))
