"""Launcher and autograd Function around the Triton routing kernels.

`sigmoid_topk_routing_triton(logits, topk, ...)`: the fused routing, differentiable through probs
and topk_probs, with the contract of reference.py.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
from torch import Tensor

from . import triton_kernels as K
from .reference import Routing


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters. Benchmarks may replace `CONFIG`; results do not depend on it."""

    routing_block_t: int = 8  # tokens per routing program (fastest on the H100 at Ring-mini shapes)
    routing_warps: int = 4


CONFIG = KernelConfig()


def check_routing_shape(num_experts: int, topk: int, num_groups: Optional[int],
                        group_topk: Optional[int]) -> Optional[str]:
    """Why the fused routing kernel cannot take this configuration, or None if it can."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if not pow2(num_experts):
        return f"num_experts={num_experts} is not a power of two"
    if not 1 <= topk <= num_experts:
        return f"topk={topk} is not in [1, num_experts={num_experts}]"
    if group_topk:
        if not num_groups or not pow2(num_groups) or num_experts % num_groups:
            return f"num_groups={num_groups} is not a power of two dividing {num_experts}"
        if not 1 <= group_topk <= num_groups or topk % group_topk:
            return f"group_topk={group_topk} must divide topk={topk} and be <= num_groups"
        if topk // group_topk > num_experts // num_groups:
            return "topk // group_topk exceeds the group size"
    return None


class SigmoidTopKRoutingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, expert_bias: Optional[Tensor], topk: int, num_groups: int,
                group_topk: int, scaling: Optional[float]):
        T, E = logits.shape
        dev = logits.device
        probs = torch.empty(T, E, dtype=torch.float32, device=dev)
        routing_map = torch.empty(T, E, dtype=torch.int8, device=dev)
        topk_probs = torch.empty(T, topk, dtype=torch.float32, device=dev)
        topk_idx = torch.empty(T, topk, dtype=torch.int32, device=dev)
        counts = torch.zeros(E, dtype=torch.int32, device=dev)
        bt = CONFIG.routing_block_t
        grouped = bool(group_topk) and num_groups > 1
        K.routing_fwd_kernel[(triton.cdiv(T, bt),)](
            logits, probs if expert_bias is None else expert_bias, probs, routing_map,
            topk_probs, topk_idx, counts, T, logits.stride(0), float(scaling or 1.0), E=E,
            G=num_groups if grouped else 1, M=topk // group_topk if grouped else 1,
            GK=group_topk if grouped else 1, K=topk, BK=triton.next_power_of_2(topk),
            HAS_BIAS=expert_bias is not None, NORMALIZE=topk > 1, SCALE=bool(scaling), BT=bt,
            num_warps=CONFIG.routing_warps)
        routing_map = routing_map.view(torch.bool)
        ctx.save_for_backward(logits, routing_map, topk_idx)
        ctx.topk, ctx.scaling = topk, scaling
        ctx.mark_non_differentiable(routing_map, topk_idx, counts)
        # Gradients of unused outputs (the router uses probs, not topk_probs) arrive as None
        # instead of zero tensors that backward would scatter.
        ctx.set_materialize_grads(False)
        return probs, routing_map, topk_probs, topk_idx, counts

    @staticmethod
    def backward(ctx, g_probs, _g_map, g_topk, _g_idx, _g_counts):
        logits, routing_map, topk_idx = ctx.saved_tensors
        T, E = logits.shape
        grad = torch.zeros(T, E, dtype=torch.float32, device=logits.device) if g_probs is None \
            else g_probs.float().contiguous()
        if g_topk is not None:
            grad = grad.scatter_add(1, topk_idx.long(), g_topk.float())
        dlogits = torch.empty(T, E, dtype=torch.float32, device=logits.device)
        bt = CONFIG.routing_block_t
        K.routing_bwd_kernel[(triton.cdiv(T, bt),)](
            grad, logits, routing_map.view(torch.int8), dlogits, T, logits.stride(0),
            float(ctx.scaling or 1.0), E=E, NORMALIZE=ctx.topk > 1, SCALE=bool(ctx.scaling),
            BT=bt, num_warps=CONFIG.routing_warps)
        return dlogits.to(logits.dtype), None, None, None, None, None


def sigmoid_topk_routing_triton(logits: Tensor, topk: int, *, expert_bias: Optional[Tensor] = None,
                                num_groups: Optional[int] = None, group_topk: Optional[int] = None,
                                scaling_factor: Optional[float] = None) -> Routing:
    """Fused routing of logits [T, E]; see reference.sigmoid_topk_routing_reference."""
    T, E = logits.shape
    reason = check_routing_shape(E, topk, num_groups, group_topk)
    if reason:
        raise ValueError(f"fused MoE routing: {reason}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    outputs = SigmoidTopKRoutingFunction.apply(logits, bias, topk, num_groups or 1,
                                               group_topk or 0, scaling_factor)
    return Routing(*outputs)
