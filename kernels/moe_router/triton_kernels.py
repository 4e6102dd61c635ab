"""Triton kernels of the MoE router (reference.py has the math).

`matmul_kernel`: C = A @ B read through strides, accumulated in fp32; the router's three GEMMs
(logits = x W^T, dx = dlogits W, dW = dlogits^T x) use it, so no fp32 copy of x is ever made.
bf16 x bf16 runs on bf16 tensor cores (products of bf16 values are exact in fp32); any fp32
operand makes both operands fp32 with `PRECISION` ("tf32x3", three TF32 products, close to fp32,
for an fp32 gradient against a bf16 operand; "ieee" when all operands are fp32, and in the
interpreter). Split-K (grid axis 2) writes one partial C per split.

`routing_fwd_kernel`: one program per BT tokens holds their [BT, E] logits in registers and does
sigmoid, expert bias, group-limited top-k, top-k, normalisation and scaling in one pass; writes
the dense probs and routing map, the top-k probs and indices, and adds its tokens to the
per-expert counts. `routing_bwd_kernel`: dlogits from dprobs through the chosen experts only.
E, the group count G and the group size E / G are powers of two.
"""

import triton
import triton.language as tl


@triton.jit
def matmul_kernel(a, b, c, M, N, K, k_split, s_am, s_ak, s_bk, s_bn, s_cs, s_cm, s_cn,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    k_start = pid_s * k_split
    k_end = tl.minimum(k_start + k_split, K)
    a_rows = a + rm[:, None].to(tl.int64) * s_am
    b_cols = b + rn[None, :].to(tl.int64) * s_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < k_end
        av = tl.load(a_rows + rk[None, :].to(tl.int64) * s_ak,
                     mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        bv = tl.load(b_cols + rk[:, None].to(tl.int64) * s_bk,
                     mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        if FP32:
            acc = tl.dot(av.to(tl.float32), bv.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(av, bv, acc)
    c_ptrs = c + pid_s.to(tl.int64) * s_cs + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn
    tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def routing_fwd_kernel(logits, bias, probs, routing_map, topk_probs, topk_idx, counts, T,
                       s_lt, scaling, E: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
                       GK: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, SCALE: tl.constexpr,
                       BT: tl.constexpr):
    """G > 1: group-limited (M = topk // topk_group best per group make its score, keep GK
    groups). Ties go to the lower index."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    cols = tl.arange(0, E)
    l = tl.load(logits + rows[:, None].to(tl.int64) * s_lt + cols[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    s = tl.sigmoid(l)
    b = s
    if HAS_BIAS:
        b = s + tl.load(bias + cols).to(tl.float32)[None, :]
    if G > 1:
        GS: tl.constexpr = E // G
        v = tl.reshape(b, (BT, G, GS))
        inner = tl.arange(0, GS)
        group_score = tl.zeros((BT, G), dtype=tl.float32)
        for _ in tl.static_range(M):
            group_score += tl.max(v, axis=2)
            top = tl.argmax(v, axis=2)
            v = tl.where(inner[None, None, :] == top[:, :, None], float("-inf"), v)
        gcols = tl.arange(0, G)
        kept = tl.zeros((BT, G), dtype=tl.int32)
        for _ in tl.static_range(GK):
            top = tl.argmax(group_score, axis=1)
            hit = gcols[None, :] == top[:, None]
            kept = tl.where(hit, 1, kept)
            group_score = tl.where(hit, float("-inf"), group_score)
        kept_e = tl.reshape(tl.broadcast_to(kept[:, :, None], (BT, G, GS)), (BT, E))
        b = tl.where(kept_e != 0, b, float("-inf"))
    kcols = tl.arange(0, BK)
    chosen = tl.zeros((BT, E), dtype=tl.int32)
    idx = tl.zeros((BT, BK), dtype=tl.int32)
    for j in tl.static_range(K):
        top = tl.argmax(b, axis=1)
        hit = cols[None, :] == top[:, None]
        chosen = tl.where(hit, 1, chosen)
        b = tl.where(hit, float("-inf"), b)
        idx = tl.where(kcols[None, :] == j, top[:, None], idx)
    sel = chosen != 0
    p = tl.where(sel, s, 0.0)
    if NORMALIZE:
        p = p / (tl.sum(p, axis=1) + 1e-20)[:, None]
    if SCALE:
        p = p * scaling
    dense = rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(probs + dense, p, mask=row_ok[:, None])
    tl.store(routing_map + dense, chosen.to(tl.int8), mask=row_ok[:, None])
    top_p = tl.zeros((BT, BK), dtype=tl.float32)
    for j in tl.static_range(K):
        e_j = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
        p_j = tl.sum(tl.where(cols[None, :] == e_j[:, None], p, 0.0), axis=1)
        top_p = tl.where(kcols[None, :] == j, p_j[:, None], top_p)
    compact = rows[:, None].to(tl.int64) * K + kcols[None, :]
    k_mask = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(topk_probs + compact, top_p, mask=k_mask)
    tl.store(topk_idx + compact, idx, mask=k_mask)
    tl.atomic_add(counts + cols, tl.sum(tl.where(row_ok[:, None], chosen, 0), axis=0))


@triton.jit
def routing_bwd_kernel(grad, logits, routing_map, dlogits, T, s_lt, scaling, E: tl.constexpr,
                       NORMALIZE: tl.constexpr, SCALE: tl.constexpr, BT: tl.constexpr):
    """dlogits_j = ds_j s_j (1 - s_j) on chosen j, with p = c s / (sum s + 1e-20):
    ds_j = c (g_j - sum_i g_i s_i / den) / den."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    cols = tl.arange(0, E)
    dense = rows[:, None].to(tl.int64) * E + cols[None, :]
    g = tl.load(grad + dense, mask=row_ok[:, None], other=0.0).to(tl.float32)
    l = tl.load(logits + rows[:, None].to(tl.int64) * s_lt + cols[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    sel = tl.load(routing_map + dense, mask=row_ok[:, None], other=0) != 0
    s = tl.sigmoid(l)
    w = tl.where(sel, s, 0.0)
    if SCALE:
        g = g * scaling
    if NORMALIZE:
        den = tl.sum(w, axis=1) + 1e-20
        gw = tl.sum(tl.where(sel, g * w, 0.0), axis=1)
        ds = (g - (gw / den)[:, None]) / den[:, None]
    else:
        ds = g
    dl = tl.where(sel, ds * s * (1.0 - s), 0.0)
    tl.store(dlogits + dense, dl, mask=row_ok[:, None])
