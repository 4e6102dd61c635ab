"""Launchers and autograd Functions around the Triton router kernels.

`router_logits_triton(x, weight)`: fp32 logits of bf16 (or fp32) x and weight, differentiable in
both, without an fp32 copy of x in the forward or the backward.
`sigmoid_topk_routing_triton(logits, topk, ...)`: the fused routing, differentiable through probs
and topk_probs. Both have the contracts of reference.py.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
from torch import Tensor

from kernels.triton_support import interpreting

from . import triton_kernels as K
from .reference import Routing


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters. Benchmarks may replace `CONFIG`; results do not depend on it."""

    mm_block: tuple = (128, 128, 64)  # BM, BN, BK of the logits GEMM (bf16 operands)
    # fp32 operand tiles take twice the shared memory: smaller BK keeps 3 stages well within it
    dgrad_block: tuple = (128, 128, 32)  # of dx = dlogits W
    wgrad_block: tuple = (64, 128, 32)  # of dW = dlogits^T x (contracts over tokens)
    wgrad_programs: int = 256  # split the token axis of dW until about this many programs
    mm_warps: int = 8
    mm_stages: int = 3
    # fp32 operands (the logit gradient): three TF32 products per product, close to fp32.
    precision: str = "tf32x3"
    routing_block_t: int = 16  # tokens per routing program
    routing_warps: int = 4


CONFIG = KernelConfig()


def launch_matmul(a: Tensor, b: Tensor, c: Tensor, block: tuple, splits: int = 1) -> None:
    """c = a @ b (a [M, K], b [K, N], any strides). c is [M, N], or [splits, M, N] to receive one
    partial product per split of K (sum them for the result)."""
    M, Kdim = a.shape
    N = b.shape[1]
    bm, bn, bk = block
    k_split = triton.cdiv(triton.cdiv(Kdim, splits), bk) * bk
    splits = triton.cdiv(Kdim, k_split) if Kdim else 1
    c3 = c if c.dim() == 3 else c.unsqueeze(0)
    assert c3.shape[0] >= splits, (tuple(c3.shape), splits)
    # The interpreter's bf16 dot is wrong (triton 3.9): it always upcasts, exactly.
    fp32 = interpreting() or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16
    # A gradient (fp32) against a bf16 operand: CONFIG.precision. Only fp32 operands (an fp32
    # model): exact fp32 products, as megatron's fp32 GEMM.
    exact = interpreting() or torch.bfloat16 not in (a.dtype, b.dtype)
    precision = "ieee" if exact else CONFIG.precision
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), splits)
    K.matmul_kernel[grid](a, b, c3, M, N, Kdim, k_split, *a.stride(), *b.stride(), *c3.stride(),
                          BM=bm, BN=bn, BK=bk, FP32=fp32, PRECISION=precision,
                          num_warps=CONFIG.mm_warps, num_stages=CONFIG.mm_stages)


class RouterLogitsFunction(torch.autograd.Function):
    """logits [T, E] fp32 = x [T, d] @ weight [E, d]^T."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        logits = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
        launch_matmul(x, weight.t(), logits, CONFIG.mm_block)
        ctx.save_for_backward(x, weight)
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            launch_matmul(grad, weight, dx, CONFIG.dgrad_block)
        if ctx.needs_input_grad[1]:
            bm, bn, bk = CONFIG.wgrad_block
            tiles = triton.cdiv(weight.shape[0], bm) * triton.cdiv(weight.shape[1], bn)
            splits = max(1, min(CONFIG.wgrad_programs // tiles, triton.cdiv(x.shape[0], 4 * bk)))
            partial = torch.empty(splits, *weight.shape, dtype=torch.float32, device=x.device)
            launch_matmul(grad.t(), x, partial, CONFIG.wgrad_block, splits)
            dw = (partial[0] if splits == 1 else partial.sum(dim=0)).to(weight.dtype)
        return dx, dw


def router_logits_triton(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., d] (bf16 or fp32), weight [E, d] -> fp32 logits [..., E]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    logits = RouterLogitsFunction.apply(x.reshape(-1, x.shape[-1]), weight)
    return logits.view(*x.shape[:-1], weight.shape[0])


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
