"""Launchers and autograd Functions around the Triton permutation kernels.

`permute_triton` and `unpermute_triton` have the contracts of reference.permute / unpermute.
The permuted row count is data dependent: without `num_out_rows` it is read back from the device
(one small device-to-host copy, which also checks max_experts_per_token); with it nothing is read
back, and the caller guarantees it is at least the padded total (T * K + E * (align - 1) always
is; rows past the groups are zeros).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from . import triton_kernels as K
from .reference import PermutePlan


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters. Benchmarks may replace `CONFIG`; results do not depend on it."""

    plan_block_t: int = 64  # tokens per planning program
    offsets_block: int = 64  # token blocks per step of the scan over blocks
    rows_block_t: int = 16  # tokens per row-movement program
    rows_block_d: int = 512  # columns per row-movement program
    pad_block_r: int = 32
    pad_block_d: int = 512
    warps: int = 4


CONFIG = KernelConfig()


def _pad_rows(out: Tensor, plan_tensors, num_rows: int, out_probs=None, row_map=None) -> None:
    counts, padded, starts = plan_tensors
    E = counts.shape[0]
    K.pad_rows_kernel[(E + 1,)](
        out, out if out_probs is None else out_probs, starts if row_map is None else row_map,
        counts, padded, starts, num_rows, out.shape[1], out.stride(0), E=E,
        HAS_PROBS=out_probs is not None, HAS_MAP=row_map is not None, BR=CONFIG.pad_block_r,
        BD=min(CONFIG.pad_block_d, triton.next_power_of_2(out.shape[1])), num_warps=CONFIG.warps)


def _row_grid(T: int, D: int) -> Tuple[tuple, int, int]:
    bt = CONFIG.rows_block_t
    bd = min(CONFIG.rows_block_d, triton.next_power_of_2(max(D, 1)))
    return (triton.cdiv(T, bt), triton.cdiv(D, bd)), bt, bd


def gather_rows(x: Tensor, dest: Tensor, slot_expert: Tensor, probs: Optional[Tensor],
                num_tokens: int, dtype: torch.dtype) -> Tensor:
    """[T, d]: out[t] = sum_j w_j x[dest[t, j]] (w = probs[t, slot_expert[t, j]] or 1)."""
    D = x.shape[1]
    out = torch.empty(num_tokens, D, dtype=dtype, device=x.device)
    grid, bt, bd = _row_grid(num_tokens, D)
    K.gather_rows_kernel[grid](
        x, dest, slot_expert, x if probs is None else probs, out, num_tokens, D, x.stride(0),
        out.stride(0), 0 if probs is None else probs.stride(0), K=dest.shape[1],
        HAS_PROBS=probs is not None, BT=bt, BD=bd, num_warps=CONFIG.warps)
    return out


def scatter_rows(x: Tensor, dest: Tensor, slot_expert: Tensor, probs: Optional[Tensor],
                 out: Tensor, y: Optional[Tensor] = None) -> Optional[Tensor]:
    """out[dest[t, j]] = w_j x[t]; with y, returns [T, K] fp32 of x[t] . y[dest[t, j]]."""
    T, D = x.shape
    grid, bt, bd = _row_grid(T, D)
    kslots = dest.shape[1]
    dprobs = None if y is None else torch.empty(grid[1], T, kslots, dtype=torch.float32,
                                                device=x.device)
    K.scatter_rows_kernel[grid](
        x, dest, slot_expert, x if probs is None else probs, out, out if y is None else y,
        x if dprobs is None else dprobs, T, D, x.stride(0), out.stride(0),
        0 if y is None else y.stride(0), 0 if probs is None else probs.stride(0), K=kslots,
        HAS_PROBS=probs is not None, DPROBS=y is not None, BT=bt, BD=bd,
        num_warps=CONFIG.warps)
    return None if dprobs is None else dprobs.sum(dim=0)


def _dense_probs_grad(compact: Tensor, dest: Tensor, slot_expert: Tensor, num_experts: int
                      ) -> Tensor:
    """[T, K] per-slot gradient -> [T, E] on the slots' experts."""
    compact = torch.where(dest >= 0, compact, compact.new_zeros(()))
    grad = compact.new_zeros(dest.shape[0], num_experts)
    return grad.scatter_add_(1, slot_expert.clamp(min=0).long(), compact)


def make_plan_triton(routing_map: Tensor, probs: Optional[Tensor], max_experts_per_token: int,
                     align: int, num_out_rows: Optional[int]):
    """Plan tensors and the permuted probs: (dest, slot_expert, row_map, padded, counts,
    starts, permuted probs or None)."""
    T, E = routing_map.shape
    dev = routing_map.device
    kslots = max_experts_per_token
    m8 = routing_map.contiguous().view(torch.int8)
    be = triton.next_power_of_2(E)
    bt = CONFIG.plan_block_t
    nblk = triton.cdiv(T, bt)
    i32 = dict(dtype=torch.int32, device=dev)
    block_counts = torch.empty(nblk, E, **i32)
    block_base = torch.empty(nblk, E, **i32)
    counts, padded = torch.empty(E, **i32), torch.empty(E, **i32)
    starts = torch.empty(E + 1, **i32)
    stats = torch.zeros(2, **i32)
    if nblk:
        K.block_counts_kernel[(nblk,)](m8, block_counts, stats, T, E=E, BE=be, BT=bt,
                                       num_warps=CONFIG.warps)
    K.offsets_kernel[(1,)](block_counts, block_base, counts, padded, starts, stats, nblk, align,
                           E=E, BE=be, BB=CONFIG.offsets_block, num_warps=CONFIG.warps)
    if num_out_rows is None:
        total, most = stats.tolist()
        if most > kslots:
            raise ValueError(f"a token is routed to {most} experts, more than "
                             f"max_experts_per_token={kslots}")
        num_out_rows = total
    row_map = torch.empty(num_out_rows, **i32)
    dest = torch.empty(T, kslots, **i32)
    slot_expert = torch.empty(T, kslots, **i32)
    out_probs = None
    if probs is not None:
        out_probs = torch.empty(num_out_rows, dtype=torch.float32, device=dev)
    if nblk:
        K.plan_kernel[(nblk,)](
            m8, probs if probs is not None else block_base, block_base, starts, dest,
            slot_expert, row_map, out_probs if out_probs is not None else row_map, T,
            num_out_rows, 0 if probs is None else probs.stride(0), E=E, BE=be, K=kslots,
            HAS_PROBS=probs is not None, BT=bt, num_warps=CONFIG.warps)
    return dest, slot_expert, row_map, padded, counts, starts, out_probs


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: Tensor, probs: Optional[Tensor], routing_map: Tensor,
                max_experts_per_token: int, align: int, num_out_rows: Optional[int]):
        dest, slot_expert, row_map, padded, counts, starts, out_probs = make_plan_triton(
            routing_map, None if probs is None else probs.float(), max_experts_per_token, align,
            num_out_rows)
        out = torch.empty(row_map.shape[0], tokens.shape[1], dtype=tokens.dtype,
                          device=tokens.device)
        scatter_rows(tokens, dest, slot_expert, None, out)
        _pad_rows(out, (counts, padded, starts), row_map.shape[0], out_probs, row_map)
        ctx.save_for_backward(dest, slot_expert)
        ctx.num_experts = routing_map.shape[1]
        ctx.probs_dtype = None if probs is None else probs.dtype
        ctx.mark_non_differentiable(dest, slot_expert, row_map, padded, counts, starts)
        return out, out_probs, dest, slot_expert, row_map, padded, counts, starts

    @staticmethod
    def backward(ctx, g_out, g_probs, *_):
        dest, slot_expert = ctx.saved_tensors
        d_tokens = d_probs = None
        if ctx.needs_input_grad[0] and g_out is not None:
            g_out = g_out if g_out.stride(-1) == 1 else g_out.contiguous()
            d_tokens = gather_rows(g_out, dest, slot_expert, None, dest.shape[0], g_out.dtype)
        if ctx.needs_input_grad[1] and g_probs is not None:
            compact = g_probs.float()[dest.clamp(min=0).long()]
            d_probs = _dense_probs_grad(compact, dest, slot_expert, ctx.num_experts)
            d_probs = d_probs.to(ctx.probs_dtype)
        return d_tokens, d_probs, None, None, None, None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, probs: Optional[Tensor], dest: Tensor, slot_expert: Tensor,
                counts: Tensor, padded: Tensor, starts: Tensor, num_tokens: int):
        y = y if y.stride(-1) == 1 else y.contiguous()
        out = gather_rows(y, dest, slot_expert, probs, num_tokens, y.dtype)
        ctx.save_for_backward(y, probs, dest, slot_expert, counts, padded, starts)
        return out

    @staticmethod
    def backward(ctx, g):
        y, probs, dest, slot_expert, counts, padded, starts = ctx.saved_tensors
        g = g if g.stride(-1) == 1 else g.contiguous()
        d_y = torch.empty_like(y)
        want_probs = probs is not None and ctx.needs_input_grad[1]
        compact = scatter_rows(g, dest, slot_expert, probs, d_y, y if want_probs else None)
        _pad_rows(d_y, (counts, padded, starts), d_y.shape[0])
        d_probs = None
        if want_probs:
            d_probs = _dense_probs_grad(compact, dest, slot_expert, probs.shape[1])
            d_probs = d_probs.to(probs.dtype)
        return d_y, d_probs, None, None, None, None, None, None


def permute_triton(tokens: Tensor, routing_map: Tensor, probs: Optional[Tensor] = None, *,
                   max_experts_per_token: int, align: int = 1,
                   num_out_rows: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor],
                                                                 PermutePlan]:
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    out, out_probs, dest, slot_expert, row_map, padded, counts, starts = PermuteFunction.apply(
        tokens, probs, routing_map, max_experts_per_token, align, num_out_rows)
    plan = PermutePlan(dest, slot_expert, row_map, padded, counts, starts, tokens.shape[0], align)
    return out, out_probs, plan


def unpermute_triton(permuted: Tensor, plan: PermutePlan, probs: Optional[Tensor] = None
                     ) -> Tensor:
    if probs is not None and probs.stride(-1) != 1:
        probs = probs.contiguous()
    return UnpermuteFunction.apply(permuted, probs, plan.dest, plan.slot_expert, plan.counts,
                                   plan.tokens_per_expert, plan.starts, plan.num_tokens)
