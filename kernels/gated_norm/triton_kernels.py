"""Triton kernels: grouped RMSNorm of the lightning output times sigmoid(gate), and its backward.

The [N, H*D] output (N = s*b tokens) is cut into `groups` column groups of W = H*D/groups (whole
heads); a program owns BLOCK_T tokens of one group, so each row's norm is a reduction inside the
program. The gate is read through its own strides ([s, b, H, D], e.g. a slice of the fused
projection), its gradient is written contiguous.

Numerics follow the unfused PyTorch path (reference.py): fp32 math, every op that PyTorch runs in
the activations' dtype rounded to it (`round_to`); the backward rounds once at the end.
"""

import triton
import triton.language as tl

from kernels.qk_norm_rope.triton_kernels import round_to


@triton.jit
def _tiles(pid_t, grp, N, B, stride_o, stride_gs, stride_gb, stride_gh,
           D: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tokens of this block (int64), validity, global columns, the [BLOCK_T, BLOCK_W] mask, and
    the offsets of the block in o and in gate."""
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    valid = t < N
    c = tl.arange(0, BLOCK_W)
    col = grp * W + c
    mask = valid[:, None] & (c < W)[None, :]
    o_off = t[:, None] * stride_o + col[None, :]
    g_off = ((t // B) * stride_gs + (t % B) * stride_gb)[:, None] + \
        ((col // D) * stride_gh + col % D)[None, :]
    return t, valid, col, mask, o_off, g_off


@triton.jit
def gated_norm_fwd_kernel(o_ptr, g_ptr, w_ptr, y_ptr, N, B, stride_o, stride_gs, stride_gb,
                          stride_gh, HD, eps, D: tl.constexpr, W: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ROUND: tl.constexpr):
    """Grid (cdiv(N, BLOCK_T), groups). o: [N, HD] rows `stride_o` apart; gate [s, b, H, D]
    through its strides; y: contiguous [N, HD]."""
    grp = tl.program_id(1)
    t, valid, col, mask, o_off, g_off = _tiles(tl.program_id(0), grp, N, B, stride_o, stride_gs,
                                               stride_gb, stride_gh, D, W, BLOCK_T, BLOCK_W)
    x = tl.load(o_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col < (grp + 1) * W, other=0.0).to(tl.float32)[None, :]
    r = tl.math.rsqrt(tl.sum(x * x, 1) / W + eps)[:, None]
    normed = round_to(w * round_to(x * r, ROUND), ROUND)
    y = round_to(normed * round_to(tl.sigmoid(g), ROUND), ROUND)
    tl.store(y_ptr + t[:, None] * HD + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_norm_bwd_kernel(o_ptr, g_ptr, w_ptr, dy_ptr, do_ptr, dg_ptr, dw_ptr, N, B, ITERS,
                          stride_o, stride_gs, stride_gb, stride_gh, HD, eps,
                          D: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_W: tl.constexpr, ROUND: tl.constexpr):
    """Grid (P, groups): program p sweeps token blocks p*ITERS ... (p+1)*ITERS - 1. dy, do, dg:
    contiguous [N, HD]; dw: fp32 [P, HD] partial weight gradients (the caller sums dim 0).

    Forward per row of a group: n = x * r, r = rsqrt(mean(x^2) + eps); m = w * n;
    y = m * sg, sg = sigmoid(g)."""
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    c = tl.arange(0, BLOCK_W)
    w = tl.load(w_ptr + grp * W + c, mask=c < W, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for it in range(ITERS):
        t, valid, col, mask, o_off, g_off = _tiles(pid * ITERS + it, grp, N, B, stride_o,
                                                   stride_gs, stride_gb, stride_gh, D, W,
                                                   BLOCK_T, BLOCK_W)
        x = tl.load(o_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        out_off = t[:, None] * HD + col[None, :]
        dy = tl.load(dy_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        r = tl.where(valid, tl.math.rsqrt(tl.sum(x * x, 1) / W + eps), 0.0)[:, None]
        n = x * r
        n_rounded = round_to(n, ROUND)
        sg = round_to(tl.sigmoid(g), ROUND)
        dm = dy * sg
        dgate = dy * round_to(w * n_rounded, ROUND) * sg * (1.0 - sg)
        acc += tl.sum(dm * n_rounded, 0)
        dn = dm * w
        mean_dn_n = (tl.sum(dn * n, 1) / W)[:, None]
        dx = r * (dn - n * mean_dn_n)
        tl.store(do_ptr + out_off, round_to(dx, ROUND).to(do_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + out_off, round_to(dgate, ROUND).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * HD + grp * W + c, acc, mask=c < W)
