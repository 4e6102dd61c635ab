"""MoE router: fp32 gate logits and sigmoid group-limited top-k routing; one dispatch point.

Logits: cuBLAS GEMMs with fp32 accumulation and output on CUDA (`logits.py`), the upcasting
reference elsewhere. Routing backends: triton (`triton_ops.py`; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and torch (`reference.py`, any device). CUDA tensors run the Triton kernel when
Triton is installed, other tensors the reference; the first call on each path logs which one runs.
The router module (ring_train/model/router.py) decides whether to take this path at all.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from kernels.triton_support import triton_runs, use_triton

from .logits import router_logits_fp32
from .reference import Routing, router_logits_reference, sigmoid_topk_routing_reference

__all__ = ["Routing", "router_logits", "sigmoid_topk_routing", "triton_runs",
           "unsupported_reason"]


def unsupported_reason(num_experts: int, topk: int, num_groups: Optional[int],
                       group_topk: Optional[int]) -> Optional[str]:
    """Why the fused routing kernel cannot run this configuration, or None."""
    from .triton_ops import check_routing_shape

    return check_routing_shape(num_experts, topk, num_groups, group_topk)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., d] @ weight [E, d]^T accumulated in fp32 -> fp32 [..., E], differentiable in both;
    on CUDA no fp32 copy of x or weight is made (logits.py)."""
    if x.is_cuda:
        return router_logits_fp32(x, weight)
    return router_logits_reference(x, weight)


def sigmoid_topk_routing(logits: Tensor, topk: int, *, expert_bias: Optional[Tensor] = None,
                         num_groups: Optional[int] = None, group_topk: Optional[int] = None,
                         scaling_factor: Optional[float] = None) -> Routing:
    """Sigmoid scores, expert bias, group-limited top-k, normalisation and scaling of logits
    [T, E] fp32 in one kernel (see reference.py for the math and `Routing` for the outputs)."""
    kwargs = dict(expert_bias=expert_bias, num_groups=num_groups, group_topk=group_topk,
                  scaling_factor=scaling_factor)
    if use_triton(logits, "moe router routing"):
        from .triton_ops import sigmoid_topk_routing_triton

        return sigmoid_topk_routing_triton(logits, topk, **kwargs)
    return sigmoid_topk_routing_reference(logits, topk, **kwargs)
