"""PyTorch reference of the MoE router: fp32 gate logits and sigmoid group-limited top-k routing.

The math is megatron-core's TopKRouter with moe_router_dtype="fp32" and score_function="sigmoid"
(`router_gating_linear` + `topk_routing_with_score_function` / `group_limited_topk`):

  logits = x @ W^T in fp32                                   [T, E]
  s      = sigmoid(logits)                                    routing scores
  b      = s + expert_bias                                    used only to choose experts
  group score of group g = sum of the top (topk // topk_group) b in g; keep the topk_group best
  groups; choose the topk experts of largest b among the kept groups
  p_i    = scaling * s_i / (sum_{j chosen} s_j + 1e-20)      (no normalisation when topk == 1)

Gradients reach the logits only through the chosen experts' unbiased s and the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Routing:
    """What the router hands on. T tokens, E experts, k = topk."""

    probs: Tensor  # [T, E] fp32: p on the chosen experts, 0 elsewhere (megatron's routing_probs)
    routing_map: Tensor  # [T, E] bool: the chosen experts
    topk_probs: Tensor  # [T, k] fp32: p of the chosen experts, in order of decreasing biased score
    topk_indices: Tensor  # [T, k] int32: the chosen experts, same order
    tokens_per_expert: Tensor  # [E] int32: tokens routed to each expert


def router_logits_reference(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., d] @ weight[E, d]^T computed in fp32 (x upcast, as megatron does) -> [..., E]."""
    return torch.matmul(x.float(), weight.float().t())


def sigmoid_topk_routing_reference(
    logits: Tensor,
    topk: int,
    *,
    expert_bias: Optional[Tensor] = None,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
) -> Routing:
    """Routing of logits [T, E] (fp32); differentiable through probs and topk_probs."""
    T, E = logits.shape
    scores = torch.sigmoid(logits.float())
    biased = scores if expert_bias is None else scores + expert_bias.float()
    if group_topk:
        per_group = biased.detach().view(T, num_groups, E // num_groups)
        group_scores = per_group.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
        groups = group_scores.topk(group_topk, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, groups, True)
        expert_mask = group_mask.repeat_interleave(E // num_groups, dim=1)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
    indices = biased.detach().topk(topk, dim=-1).indices
    chosen = scores.gather(1, indices)
    probs = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else chosen
    if scaling_factor:
        probs = probs * scaling_factor
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    routing_map = routing_map.scatter(1, indices, True)
    dense = torch.zeros(T, E, dtype=probs.dtype, device=logits.device).scatter(1, indices, probs)
    return Routing(dense, routing_map, probs, indices.to(torch.int32),
                   routing_map.sum(dim=0, dtype=torch.int32))
