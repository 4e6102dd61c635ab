"""megatron-core's TopKRouter with the fused router kernels (kernels/moe_router).

With `config.fused_kernels` and the input on a device where the Triton kernels run, the gate
logits come from one fp32-accumulating GEMM of the bf16 input (no fp32 copy of it) and the
routing (sigmoid, expert bias, group-limited top-k, normalisation, scaling) from one kernel that
also counts the tokens per expert. Everything else is megatron's: z-loss on the logits, token
dropping, the auxiliary losses and the expert-bias bookkeeping (`local_tokens_per_expert`, here
from the kernel's counts instead of a reduction over the [T, E] routing map).
Configurations the kernels do not cover run megatron's path, and the log says so.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor

logger = logging.getLogger(__name__)


class FusedTopKRouter(TopKRouter):
    """TopKRouter whose gating GEMM and sigmoid top-k routing run as fused kernels."""

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self._unsupported = self._unfused_reason()  # None: the kernels cover this router
        self._logged = set()

    def _unfused_reason(self) -> Optional[str]:
        from kernels.moe_router import unsupported_reason

        config = self.config
        if self.score_function != "sigmoid":
            return f"moe_router_score_function={self.score_function!r} (the kernel is sigmoid)"
        if self.routing_type == "sinkhorn":
            return "sinkhorn load balancing"
        if config.moe_router_dtype != "fp32":
            return f"moe_router_dtype={config.moe_router_dtype!r} (the kernel computes in fp32)"
        if self.bias is not None:
            return "a router bias (add_bias_linear)"
        if self.router_replay is not None:
            return "routing replay"
        if config.moe_router_fusion:
            return "moe_router_fusion (Transformer Engine's fused routing) is on"
        return unsupported_reason(self.num_experts, self.topk, config.moe_router_num_groups,
                                  config.moe_router_group_topk)

    def _fused(self, x: Tensor) -> bool:
        """Whether this call runs the kernels: config.fused_kernels (read per call), a
        configuration they cover, and a device where they run; otherwise megatron's path,
        logged once per reason."""
        from kernels.moe_router import triton_runs

        if not getattr(self.config, "fused_kernels", False):
            return False
        reason = self._unsupported
        if reason is None and not triton_runs(x):
            reason = f"the Triton kernels do not run on {x.device.type}"
        if reason is not None and reason not in self._logged:
            self._logged.add(reason)
            logger.warning("fused MoE router not used: %s; megatron's router runs", reason)
        return reason is None

    def gating(self, input: Tensor) -> Tensor:
        if not self._fused(input):
            return super().gating(input)
        from kernels.moe_router import router_logits

        return router_logits(input, self.weight)

    def routing(self, logits: Tensor, padding_mask: Optional[Tensor] = None):
        """megatron's TopKRouter.routing with the score function and top-k fused."""
        if not self._fused(logits):
            return super().routing(logits, padding_mask=padding_mask)
        from kernels.moe_router import sigmoid_topk_routing

        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        routed = sigmoid_topk_routing(
            logits, self.topk, expert_bias=self.expert_bias,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
        )
        probs, routing_map = routed.probs, routed.routing_map
        tokens_per_expert = routed.tokens_per_expert
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
            tokens_per_expert = None
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                padding_mask=padding_mask,
            )
            masked = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
            probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz,
                                             with_padding_mask=masked)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map,
                                                with_padding_mask=masked)
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    # megatron's _apply_expert_bias broadcasts the [T] mask against the [T, E]
                    # map (an error unless T == E); padding tokens (mask True) do not count.
                    routing_map_counted = routing_map & ~padding_mask.unsqueeze(-1)
                    tokens_per_expert = routing_map_counted.sum(dim=0)
                elif tokens_per_expert is None:  # tokens were dropped after the kernel counted
                    tokens_per_expert = routing_map.sum(dim=0)
                self.local_tokens_per_expert += tokens_per_expert
        return probs, routing_map
