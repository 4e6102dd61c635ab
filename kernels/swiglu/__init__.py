"""SwiGLU with an optional per-row (routing probability) weight and fused FP8 emission.

    out = silu(gate) * up * p,    gate, up = torch.chunk(h, 2, -1)   (megatron's fc1 layout)

One dispatch point: the Triton kernels (triton_kernels.py) run on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1; otherwise the PyTorch reference (reference.py) runs. The first call
per device type logs which path runs.

`swiglu` is the autograd function (bf16 in, bf16 out). The FP8 expert MLP calls the low-level
`swiglu_forward` / `swiglu_backward`, which emit exactly the forms asked for (see producer.py):
e.g. forward emit=("rows",) for the fc2 GEMM, a recompute in backward emit=("columns",) for fc2's
weight gradient, and backward emit=("rows", "columns") for fc1's dgrad and wgrad GEMMs.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from kernels.triton_support import use_triton

from .producer import EMITS, Emitted
from .reference import swiglu_backward_reference, swiglu_forward_reference

__all__ = ["swiglu", "swiglu_forward", "swiglu_backward", "Emitted", "EMITS"]


def swiglu_forward(h: Tensor, probs: Optional[Tensor] = None,
                   emit: Iterable[str] = ("out",)) -> Emitted:
    """h [M, 2F] (bf16; rows through a stride, unit last stride), probs [M] (fp32) or None.

    Returns Emitted(out, rows, columns), None where not asked for in `emit`:
      out      [M, F] in h's dtype;
      rows     Fp8Tensor block1x128 of out: data [M, F], scale [M, ceil(F/128)];
      columns  Fp8Tensor block1x128 of out^T: data [F, M], scale [F, ceil(M/128)].
    """
    if use_triton(h, "swiglu"):
        from .triton_ops import swiglu_forward_triton  # imports Triton only when used

        return swiglu_forward_triton(h, probs, emit)
    return swiglu_forward_reference(h, probs, emit)


def swiglu_backward(grad_out: Tensor, h: Tensor, probs: Optional[Tensor] = None,
                    emit: Iterable[str] = ("out",)) -> tuple[Emitted, Optional[Tensor]]:
    """grad_out [M, F], h [M, 2F] (the forward's input), probs [M] or None.

    Returns (Emitted(grad_h, rows, columns), grad_probs):
      grad_h   [M, 2F] in h's dtype (gate's gradient in the first F columns, up's in the rest);
      rows     Fp8Tensor block1x128 of grad_h: data [M, 2F], scale [M, 2F/128] (needs
               F % 128 == 0, so that no group straddles gate and up);
      columns  Fp8Tensor block1x128 of grad_h^T: data [2F, M], scale [2F, ceil(M/128)];
      grad_probs [M] in probs' dtype (summed in fp32), None without probs.
    """
    if use_triton(h, "swiglu"):
        from .triton_ops import swiglu_backward_triton

        return swiglu_backward_triton(grad_out, h, probs, emit)
    return swiglu_backward_reference(grad_out, h, probs, emit)


class SwiGLUFunction(torch.autograd.Function):
    """h [M, 2F], probs [M] or None -> out [M, F]; recomputes nothing (saves h and probs)."""

    @staticmethod
    def forward(ctx, h: Tensor, probs: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(h, probs)
        return swiglu_forward(h, probs).out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, probs = ctx.saved_tensors
        grads, grad_probs = swiglu_backward(grad_out, h, probs)
        return grads.out, grad_probs if ctx.needs_input_grad[1] else None


def swiglu(h: Tensor, probs: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up (* probs) with autograd: h [..., 2F], probs [...] or None -> [..., F]
    in h's dtype (math in fp32)."""
    F = h.shape[-1] // 2
    p = None if probs is None else probs.reshape(-1)
    out = SwiGLUFunction.apply(h.reshape(-1, h.shape[-1]), p)
    return out.view(*h.shape[:-1], F)
