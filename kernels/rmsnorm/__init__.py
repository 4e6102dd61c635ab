"""RMSNorm (ring_train/model/norms.py numerics) with fused block1x128 FP8 emission of y.

    y = weight * (x * rstd).to(x.dtype),    rstd = 1 / sqrt(mean(x^2) + eps)  (fp32)

One dispatch point: the Triton kernels (triton_kernels.py) run on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1; otherwise the PyTorch reference (reference.py) runs. The first call
per device type logs which path runs.

`rms_norm` is the autograd function. FP8 layers call the low-level `rms_norm_forward` /
`rms_norm_backward`: the forward emits exactly the forms asked for (kernels/swiglu/producer.py),
e.g. emit=("rows",) in the forward pass (the next GEMM's input; rstd is saved) and, in a
recompute during backward, emit=("columns",) with the saved rstd (one pass, no row reduction)
for that GEMM's weight gradient.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from kernels.swiglu.producer import EMITS, Emitted
from kernels.triton_support import use_triton

from .reference import rms_norm_backward_reference, rms_norm_forward_reference

__all__ = ["rms_norm", "rms_norm_forward", "rms_norm_backward", "Emitted", "EMITS"]


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float = 1e-6,
                     emit: Iterable[str] = ("out",), rstd: Optional[Tensor] = None
                     ) -> tuple[Emitted, Tensor]:
    """x [M, d] (rows through a stride, unit last stride), weight [d].

    rstd: [M] fp32 saved by an earlier forward on the same x (a recompute: one pass, no row
    reduction), or None to compute it.
    Returns (Emitted(y, rows, columns), rstd [M] fp32), None where not asked for in `emit`:
      y        [M, d] in promote(x.dtype, weight.dtype) (bf16 for bf16 x and weight);
      rows     Fp8Tensor block1x128 of y: data [M, d], scale [M, ceil(d/128)];
      columns  Fp8Tensor block1x128 of y^T: data [d, M], scale [d, ceil(M/128)].
    """
    if use_triton(x, "rms_norm"):
        from .triton_ops import rms_norm_forward_triton  # imports Triton only when used

        return rms_norm_forward_triton(x, weight, eps, emit, rstd)
    return rms_norm_forward_reference(x, weight, eps, emit, rstd)


def rms_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """grad_y [M, d], x [M, d], weight [d], rstd [M] fp32 (from the forward).
    Returns (dx [M, d] in x's dtype, dweight [d] in weight's dtype, summed over M in fp32)."""
    if use_triton(x, "rms_norm"):
        from .triton_ops import rms_norm_backward_triton

        return rms_norm_backward_triton(grad_y, x, weight, rstd)
    return rms_norm_backward_reference(grad_y, x, weight, rstd)


class RMSNormFunction(torch.autograd.Function):
    """x [M, d], weight [d] -> y [M, d]; saves x, weight and rstd."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        emitted, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return emitted.out

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(grad_y, x, weight, rstd)
        return dx, dweight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """weight * rms_normalize(x, eps) with autograd: x [..., d], weight [d] -> [..., d]."""
    y = RMSNormFunction.apply(x.reshape(-1, x.shape[-1]), weight, eps)
    return y.view(x.shape)
