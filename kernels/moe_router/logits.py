"""fp32 router logits of bf16 activations and weights without an fp32 copy of either: cuBLAS
GEMMs that accumulate in fp32, forward and backward.

  forward  logits [T, E] fp32 = x [T, d] @ W [E, d]^T     bf16 operands, fp32 output
  backward g [T, E] fp32 is split into g_hi = bf16(g) and g_lo = bf16(g - g_hi) (16 significant
           bits together, relative residual <= 2^-17) and stacked along E, [T, 2E] bf16:
  dgrad    dx [T, d] = [g_hi | g_lo] @ [W; W]             one bf16 GEMM, fp32 accumulation,
                                                          rounded once to x's dtype
  wgrad    dW [E, d] = sum of the halves of [g_hi | g_lo]^T @ x (fp32 output), cast to W's dtype
bf16 x bf16 products are exact in fp32, so only g's split differs from megatron's upcast-then-fp32
GEMMs (router_gating_linear), by far less than the final rounding to bf16.

fp32 operands take plain fp32 GEMMs. On CPU, where torch.mm has no out_dtype kernel, the fp32
GEMMs run on upcast copies (same results; the dispatcher sends CPU tensors to the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.bfloat16, torch.float16)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b accumulated and returned in fp32, with no fp32 copy of half-precision operands."""
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _split(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """[g_hi | g_lo] in `dtype`: two half-precision terms whose sum is g to ~2^-17."""
    hi = grad.to(dtype)
    return torch.cat((hi, (grad - hi.float()).to(dtype)), dim=1)


class RouterLogitsFunction(torch.autograd.Function):
    """logits [T, E] fp32 = x [T, d] @ weight [E, d]^T."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _mm_fp32(x, weight.t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        E = weight.shape[0]
        half = x.dtype in _HALF and weight.dtype == x.dtype
        g = _split(grad.float(), x.dtype) if half else grad.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (torch.mm(g, torch.cat((weight, weight))) if half
                  else torch.mm(g, weight.float()).to(x.dtype))
        if ctx.needs_input_grad[1]:
            parts = _mm_fp32(g.t(), x)
            dw = (parts[:E] + parts[E:] if half else parts).to(weight.dtype)
        return dx, dw


def router_logits_fp32(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., d] (bf16, fp16 or fp32), weight [E, d] -> fp32 logits [..., E]."""
    logits = RouterLogitsFunction.apply(x.reshape(-1, x.shape[-1]), weight)
    return logits.view(*x.shape[:-1], weight.shape[0])
