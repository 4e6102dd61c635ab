"""PyTorch reference of the padded MoE permutation.

`permute` sorts token rows into expert-contiguous order, megatron's order (expert-major, tokens
in increasing index within an expert), and pads each expert's group to a multiple of `align`
rows. The padding is folded into the routing: padding rows index no token, hold zeros (a
grouped GEMM's weight gradient reads every row of a group, and 0 * NaN would poison it), carry
probability 0 and are dropped by `unpermute`. `align` 1 is megatron's permute exactly.

`unpermute` sums each token's rows back to [T, d], weighted by its routing probabilities when
given (megatron's unpermute semantics: weights applied in fp32, result in the rows' dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass
class PermutePlan:
    """Where every token went. T tokens, E experts, K = most experts a token is routed to,
    N permuted rows (padding included)."""

    dest: Tensor  # [T, K] int32: permuted row of the token's j-th expert (ascending), or -1
    slot_expert: Tensor  # [T, K] int32: that expert, or -1
    row_map: Tensor  # [N] int32: source token of each permuted row, -1 for padding
    tokens_per_expert: Tensor  # [E] int32 padded rows per expert (multiples of align), device
    counts: Tensor  # [E] int32 routed tokens per expert (without padding)
    starts: Tensor  # [E + 1] int32 first row of each expert's group; starts[E] = padded total
    num_tokens: int  # T
    align: int

    @property
    def num_rows(self) -> int:
        return self.row_map.shape[0]


def padded_counts(counts: Tensor, align: int) -> Tensor:
    return (counts + align - 1) // align * align


def make_plan(routing_map: Tensor, max_experts_per_token: int, align: int,
              num_out_rows: Optional[int] = None) -> PermutePlan:
    """The plan of routing_map [T, E] bool (each row has at most K = max_experts_per_token)."""
    T, E = routing_map.shape
    K = max_experts_per_token
    routed = routing_map.bool()
    counts = routed.sum(dim=0)
    padded = padded_counts(counts, align)
    starts = torch.cumsum(padded, 0) - padded
    rank = torch.cumsum(routed.int(), dim=0) - 1  # row of (t, e) within expert e's group
    dest_te = torch.where(routed, starts[None, :] + rank, -1)  # [T, E]
    slot = torch.cumsum(routed.int(), dim=1) - 1  # j of (t, e) among token t's experts
    if routed.any() and int(slot[routed].max()) >= K:
        raise ValueError(f"a token is routed to more than max_experts_per_token={K} experts")
    dest = torch.full((T, K), -1, dtype=torch.int64, device=routing_map.device)
    slot_expert = torch.full_like(dest, -1)
    t_idx, e_idx = routed.nonzero(as_tuple=True)
    dest[t_idx, slot[t_idx, e_idx]] = dest_te[t_idx, e_idx]
    slot_expert[t_idx, slot[t_idx, e_idx]] = e_idx
    total = int(padded.sum())
    rows = total if num_out_rows is None else num_out_rows
    if rows < total:
        raise ValueError(f"num_out_rows={rows} < {total} permuted rows")
    row_map = torch.full((rows,), -1, dtype=torch.int64, device=routing_map.device)
    row_map[dest_te[t_idx, e_idx]] = t_idx
    starts = torch.cat([starts, padded.sum().view(1)]).int()
    return PermutePlan(dest.int(), slot_expert.int(), row_map.int(), padded.int(), counts.int(),
                       starts, T, align)


def permute(tokens: Tensor, routing_map: Tensor, probs: Optional[Tensor] = None, *,
            max_experts_per_token: int, align: int = 1, num_out_rows: Optional[int] = None
            ) -> Tuple[Tensor, Optional[Tensor], PermutePlan]:
    """tokens [T, d], routing_map [T, E] bool, probs [T, E] -> (permuted tokens [N, d],
    permuted probs [N] or None, plan). Differentiable in tokens and probs."""
    plan = make_plan(routing_map, max_experts_per_token, align, num_out_rows)
    valid = plan.row_map >= 0
    src = plan.row_map.clamp(min=0).long()
    out = torch.where(valid[:, None], tokens.index_select(0, src), tokens.new_zeros(()))
    out_probs = None
    if probs is not None:
        expert = torch.repeat_interleave(
            torch.arange(routing_map.shape[1], device=tokens.device),
            plan.tokens_per_expert.long(), output_size=int(plan.tokens_per_expert.sum()))
        expert = torch.nn.functional.pad(expert, (0, plan.num_rows - expert.shape[0]))
        out_probs = torch.where(valid, probs[src, expert], probs.new_zeros(()))
    return out, out_probs, plan


def unpermute(permuted: Tensor, plan: PermutePlan, probs: Optional[Tensor] = None) -> Tensor:
    """permuted [N, d] -> [T, d]: each token's rows summed (times probs [T, E] if given), in
    fp32, returned in permuted's dtype. Differentiable in permuted and probs."""
    valid = plan.dest >= 0
    rows = permuted.float().index_select(0, plan.dest.clamp(min=0).long().view(-1))
    rows = rows.view(*plan.dest.shape, -1) * valid[..., None]
    if probs is not None:
        weights = probs.float().gather(1, plan.slot_expert.clamp(min=0).long()) * valid
        rows = rows * weights[..., None]
    return rows.sum(dim=1).to(permuted.dtype)
