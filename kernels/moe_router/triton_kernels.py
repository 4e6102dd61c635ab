"""Triton kernels of the MoE router (reference.py has the math).

`routing_fwd_kernel`: one program per BT tokens holds their [BT, E] logits in registers and does
sigmoid, expert bias, group-limited top-k, top-k, normalisation and scaling in one pass; writes
the dense probs and routing map, the top-k probs and indices, and adds its tokens to the
per-expert counts. `routing_bwd_kernel`: dlogits from dprobs through the chosen experts only.
E, the group count G and the group size E / G are powers of two.
"""

import triton
import triton.language as tl


@triton.jit
def _pop_max(v, positions):
    """Per row of v [BT, N]: the column of its largest value (the lowest on ties), that column as
    a one-hot mask, and v with it set to -inf (so the next call takes the runner-up)."""
    top = tl.argmax(v, axis=1)
    hit = positions[None, :] == top[:, None]
    return top, hit, tl.where(hit, float("-inf"), v)


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
            _, hit, group_score = _pop_max(group_score, gcols)
            kept = tl.where(hit, 1, kept)
        kept_e = tl.reshape(tl.broadcast_to(kept[:, :, None], (BT, G, GS)), (BT, E))
        b = tl.where(kept_e != 0, b, float("-inf"))
    kcols = tl.arange(0, BK)
    chosen = tl.zeros((BT, E), dtype=tl.int32)
    idx = tl.zeros((BT, BK), dtype=tl.int32)
    for j in tl.static_range(K):
        top, hit, b = _pop_max(b, cols)
        chosen = tl.where(hit, 1, chosen)
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
