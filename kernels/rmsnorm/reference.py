"""Plain PyTorch RMSNorm (ring_train/model/norms.py `RMSNorm` numerics) and its gradients.

For x [M, d] and weight [d]:

    rstd = 1 / sqrt(mean(x^2) + eps)              (fp32, per row)
    n    = (x * rstd) rounded to x's dtype       (as `rms_normalize`)
    y    = weight * n                             (in promote(x.dtype, weight.dtype))

and, treating the rounding of n as the identity (as autograd does), with x_hat = x * rstd:

    dx      = rstd * (dn - x_hat * mean(dn * x_hat)),   dn = dy * weight
    dweight = sum_M dy * n                        (fp32 sum, then weight's dtype)
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from kernels.swiglu.producer import Emitted
from kernels.swiglu.reference import emit_reference


def rms_rstd(x: Tensor, eps: float) -> Tensor:
    """1 / rms(x) over the last dim, fp32 [...]."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6,
                       rstd: Optional[Tensor] = None) -> Tensor:
    """weight * rms_normalize(x, eps) (ring_train.model.norms); x [..., d], weight [d].
    Differentiable (tests take its gradients through autograd)."""
    if rstd is None:
        rstd = rms_rstd(x, eps)
    return weight * (x.float() * rstd.unsqueeze(-1)).to(x.dtype)


def rms_norm_forward_reference(x: Tensor, weight: Tensor, eps: float = 1e-6,
                               emit: Iterable[str] = ("out",), rstd: Optional[Tensor] = None
                               ) -> tuple[Emitted, Tensor]:
    """The reference of `rms_norm_forward`: x [M, d] -> (Emitted(y, rows, columns), rstd [M])."""
    if rstd is None:
        rstd = rms_rstd(x, eps)
    return emit_reference(rms_norm_reference(x, weight, eps, rstd), emit), rstd


def rms_norm_backward_reference(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
                                ) -> tuple[Tensor, Tensor]:
    """The reference of `rms_norm_backward`: (dx [M, d] in x's dtype, dweight [d] in weight's)."""
    x_hat = x.float() * rstd.unsqueeze(-1)
    dy = grad_y.float()
    dn = dy * weight.float()
    dx = rstd.unsqueeze(-1) * (dn - x_hat * (dn * x_hat).mean(-1, keepdim=True))
    dweight = (dy * x_hat.to(x.dtype).float()).sum(0)
    return dx.to(x.dtype), dweight.to(weight.dtype)
