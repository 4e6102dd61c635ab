"""Triton kernels of the padded MoE permutation (reference.py has the semantics).

Planning, from the routing map [T, E] (int8 0/1) cut into blocks of BT tokens:
  block_counts_kernel  per block, tokens routed to each expert                    [nblk, E]
  offsets_kernel       one program: exclusive scan of those over blocks (each block's first row
                       within an expert's group), the counts, the padded counts and the group
                       starts [E + 1]
  plan_kernel          per block: every (token, expert) pair's permuted row (group start + row
                       of the block + rank in the block), written as the per-token map dest
                       [T, K] (its experts in ascending order), slot_expert [T, K], the inverse
                       row_map [N] and the permuted probabilities
Row movement, a program per (block of tokens, block of columns), each row read or written once:
  scatter_rows_kernel  out[dest[t, j]] = w_j * x[t]   (permute; unpermute's backward, which
                       also dots the incoming gradient with the rows for the probs' gradient)
  gather_rows_kernel   out[t] = sum_j w_j * x[dest[t, j]] in fp32   (unpermute; permute's backward)
  pad_rows_kernel      zeros on the padding rows of each group and on rows past the last group
"""

import triton
import triton.language as tl


@triton.jit
def _map_tile(routing_map, rows, T, E: tl.constexpr, BE: tl.constexpr):
    cols = tl.arange(0, BE)
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    m = tl.load(routing_map + rows[:, None].to(tl.int64) * E + cols[None, :], mask=mask, other=0)
    return (m != 0).to(tl.int32), cols


@triton.jit
def block_counts_kernel(routing_map, block_counts, stats, T, E: tl.constexpr, BE: tl.constexpr,
                        BT: tl.constexpr):
    """Also stats[1] = max over tokens of the experts a token is routed to."""
    pid = tl.program_id(0)
    m, cols = _map_tile(routing_map, pid * BT + tl.arange(0, BT), T, E, BE)
    tl.store(block_counts + pid * E + cols, tl.sum(m, axis=0), mask=cols < E)
    tl.atomic_max(stats + 1, tl.max(tl.sum(m, axis=1), axis=0))


@triton.jit
def offsets_kernel(block_counts, block_base, counts, padded, starts, stats, nblk, align,
                   E: tl.constexpr, BE: tl.constexpr, BB: tl.constexpr):
    """Also stats[0] = starts[E], the padded total."""
    cols = tl.arange(0, BE)
    col_ok = cols < E
    carry = tl.zeros((BE,), dtype=tl.int32)
    for b0 in range(0, nblk, BB):
        blocks = b0 + tl.arange(0, BB)
        mask = (blocks < nblk)[:, None] & col_ok[None, :]
        ptrs = blocks[:, None] * E + cols[None, :]
        tile = tl.load(block_counts + ptrs, mask=mask, other=0)
        tl.store(block_base + ptrs, carry[None, :] + tl.cumsum(tile, axis=0) - tile, mask=mask)
        carry += tl.sum(tile, axis=0)
    pad = (carry + align - 1) // align * align
    tl.store(counts + cols, carry, mask=col_ok)
    tl.store(padded + cols, pad, mask=col_ok)
    tl.store(starts + cols, tl.cumsum(pad, axis=0) - pad, mask=col_ok)
    tl.store(starts + E, tl.sum(pad, axis=0))
    tl.store(stats, tl.sum(pad, axis=0))


@triton.jit
def plan_kernel(routing_map, probs, block_base, starts, dest, slot_expert, row_map, out_probs,
                T, num_rows, s_pt, E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr,
                HAS_PROBS: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    m, cols = _map_tile(routing_map, rows, T, E, BE)
    col_ok = cols < E
    first = tl.load(block_base + pid * E + cols, mask=col_ok, other=0) + \
        tl.load(starts + cols, mask=col_ok, other=0)
    pos = first[None, :] + tl.cumsum(m, axis=0) - m  # permuted row of each routed (t, e)
    slot = tl.cumsum(m, axis=1) - m  # j of (t, e): experts of a token in ascending order
    if HAS_PROBS:
        p = tl.load(probs + rows[:, None].to(tl.int64) * s_pt + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    for j in tl.static_range(K):
        hit = (m != 0) & (slot == j)
        row_j = tl.sum(tl.where(hit, pos, 0), axis=1)
        # row_j < num_rows only fails if the caller's num_out_rows was too small
        has = (tl.sum(hit.to(tl.int32), axis=1) > 0) & row_ok & (row_j < num_rows)
        expert_j = tl.sum(tl.where(hit, cols[None, :], 0), axis=1)
        tl.store(dest + rows * K + j, tl.where(has, row_j, -1), mask=row_ok)
        tl.store(slot_expert + rows * K + j, tl.where(has, expert_j, -1), mask=row_ok)
        tl.store(row_map + row_j, rows, mask=has)
        if HAS_PROBS:
            tl.store(out_probs + row_j, tl.sum(tl.where(hit, p, 0.0), axis=1), mask=has)


@triton.jit
def _slot(dest, slot_expert, probs, rows, row_ok, j, s_pt, K: tl.constexpr,
          HAS_PROBS: tl.constexpr):
    """Permuted row of slot j of each token (or -1) and its weight (1 without probs)."""
    row_j = tl.load(dest + rows * K + j, mask=row_ok, other=-1)
    has = row_j >= 0
    w = tl.full(row_j.shape, 1.0, tl.float32)
    if HAS_PROBS:
        e_j = tl.load(slot_expert + rows * K + j, mask=has, other=0)
        w = tl.load(probs + rows.to(tl.int64) * s_pt + e_j, mask=has, other=0.0).to(tl.float32)
    return row_j, has, w


@triton.jit
def scatter_rows_kernel(x, dest, slot_expert, probs, out, y, dprobs, T, D, s_x, s_out, s_y,
                        s_pt, K: tl.constexpr, HAS_PROBS: tl.constexpr, DPROBS: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr):
    """out[dest[t, j]] = w_j x[t]; DPROBS: also dprobs[pid_d, t, j] = x[t] . y[dest[t, j]] over
    this program's columns (the caller sums over column blocks)."""
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    dcols = pid_d * BD + tl.arange(0, BD)
    d_ok = dcols < D
    xv = tl.load(x + rows[:, None].to(tl.int64) * s_x + dcols[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    for j in tl.static_range(K):
        row_j, has, w = _slot(dest, slot_expert, probs, rows, row_ok, j, s_pt, K, HAS_PROBS)
        mask = has[:, None] & d_ok[None, :]
        target = row_j[:, None].to(tl.int64)
        if HAS_PROBS:
            tl.store(out + target * s_out + dcols[None, :],
                     (xv.to(tl.float32) * w[:, None]).to(out.dtype.element_ty), mask=mask)
        else:
            tl.store(out + target * s_out + dcols[None, :], xv.to(out.dtype.element_ty),
                     mask=mask)
        if DPROBS:
            yv = tl.load(y + target * s_y + dcols[None, :], mask=mask, other=0.0)
            part = tl.sum(xv.to(tl.float32) * yv.to(tl.float32), axis=1)
            tl.store(dprobs + (pid_d * T + rows).to(tl.int64) * K + j, part, mask=row_ok)


@triton.jit
def gather_rows_kernel(x, dest, slot_expert, probs, out, T, D, s_x, s_out, s_pt,
                       K: tl.constexpr, HAS_PROBS: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr):
    """out[t] = sum_j w_j x[dest[t, j]], summed in fp32."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    dcols = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = dcols < D
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(K):
        row_j, has, w = _slot(dest, slot_expert, probs, rows, row_ok, j, s_pt, K, HAS_PROBS)
        xv = tl.load(x + row_j[:, None].to(tl.int64) * s_x + dcols[None, :],
                     mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_PROBS:
            xv = xv * w[:, None]
        acc += xv
    tl.store(out + rows[:, None].to(tl.int64) * s_out + dcols[None, :],
             acc.to(out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_rows"])  # a tensor in both branches below, even if 1
def pad_rows_kernel(out, out_probs, row_map, counts, padded, starts, num_rows, D, s_out,
                    E: tl.constexpr, HAS_PROBS: tl.constexpr, HAS_MAP: tl.constexpr,
                    BR: tl.constexpr, BD: tl.constexpr):
    """Program e < E: the padding rows of expert e's group; program E: rows past the groups."""
    e = tl.program_id(0)
    if e < E:
        start = tl.load(starts + e)
        lo = start + tl.load(counts + e)
        hi = start + tl.load(padded + e)
    else:
        lo = tl.load(starts + E)
        hi = num_rows
    for r0 in range(lo, hi, BR):
        r = r0 + tl.arange(0, BR)
        r_ok = r < hi
        for d0 in range(0, D, BD):
            dcols = d0 + tl.arange(0, BD)
            tl.store(out + r[:, None].to(tl.int64) * s_out + dcols[None, :],
                     tl.zeros((BR, BD), dtype=out.dtype.element_ty),
                     mask=r_ok[:, None] & (dcols < D)[None, :])
        if HAS_MAP:
            tl.store(row_map + r, tl.full((BR,), -1, tl.int32), mask=r_ok)
        if HAS_PROBS:
            tl.store(out_probs + r, tl.zeros((BR,), dtype=tl.float32), mask=r_ok)
