"""Padded MoE token permutation: expert-contiguous rows, each expert's group padded to a multiple
of `align` (16 for bf16 grouped GEMMs, 128 for FP8 blockwise ones); one dispatch point.

Backends: triton (`triton_ops.py`; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and torch
(`reference.py`, any device). The first call on each path logs which one runs.

  permuted, permuted_probs, plan = permute(tokens, routing_map, probs, max_experts_per_token=k,
                                           align=16)
  ... experts(permuted, plan.tokens_per_expert, permuted_probs) ...
  out = unpermute(expert_out, plan)            # or unpermute(expert_out, plan, probs) to weight
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from kernels.triton_support import use_triton

from .reference import PermutePlan
from .reference import permute as permute_reference
from .reference import unpermute as unpermute_reference

__all__ = ["PermutePlan", "permute", "unpermute"]


def permute(tokens: Tensor, routing_map: Tensor, probs: Optional[Tensor] = None, *,
            max_experts_per_token: int, align: int = 1, num_out_rows: Optional[int] = None
            ) -> Tuple[Tensor, Optional[Tensor], PermutePlan]:
    """Rows of tokens [T, d] in expert-contiguous order (megatron's order), each expert's group
    padded with zero rows to a multiple of `align`.

    routing_map [T, E] bool (a token has at most max_experts_per_token experts); probs [T, E]
    (fp32) gives the permuted probabilities (0 on padding rows). Returns (permuted [N, d],
    permuted probs [N] fp32 or None, plan); plan.tokens_per_expert [E] int32 (device) holds the
    padded group sizes. num_out_rows: see triton_ops (None reads N back from the device).
    Differentiable in tokens and probs.
    """
    kwargs = dict(max_experts_per_token=max_experts_per_token, align=align,
                  num_out_rows=num_out_rows)
    if use_triton(tokens, "moe permute"):
        from .triton_ops import permute_triton

        return permute_triton(tokens, routing_map, probs, **kwargs)
    return permute_reference(tokens, routing_map, probs, **kwargs)


def unpermute(permuted: Tensor, plan: PermutePlan, probs: Optional[Tensor] = None) -> Tensor:
    """[N, d] -> [T, d]: each token's rows summed in fp32 (weighted by probs [T, E] if given),
    padding rows dropped; returned in permuted's dtype. Differentiable in permuted and probs."""
    if use_triton(permuted, "moe unpermute"):
        from .triton_ops import unpermute_triton

        return unpermute_triton(permuted, plan, probs)
    return unpermute_reference(permuted, plan, probs)
