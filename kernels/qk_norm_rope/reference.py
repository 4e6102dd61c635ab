"""The unfused PyTorch sequence that `qkvg_split_norm_rope` replaces: the kernels' yardstick.

It is the lightning layer's own code path, op for op, so that it rounds where the model rounds:
  split     qkvg [s, b, H*4*D] viewed [s, b, H, 4, D]; each head's rows are [q_h; k_h; v_h; g_h]
  silu      optional, on q, k, v (in their dtype)
  rms norm  `ring_train.model.norms.RMSNorm`: normalise in fp32, cast back, times the weight
  rope      megatron-core's `_apply_rotary_pos_emb_bshd` (rotary_interleaved False, no fusion):
            cos/sin of the fp32 freqs are cast to the input's dtype and the rotation runs in it
The outputs are contiguous copies (the fused kernel's layout); the values are the model path's.
tests/kernels/test_qk_norm_rope.py checks this file against the model's modules to the bit.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

QKVG = 4  # rows per head in the fused projection: q, k, v, gate

Freqs = Optional[Union[Tensor, tuple[Tensor, Tensor]]]


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, computed in fp32, returned in x's dtype (norms.py)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """NeoX rotate-half: [x1, x2] -> [-x2, x1] over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(t: Tensor, freqs: Tensor) -> Tensor:
    """t [s, b, H, D], freqs [s, 1 or b, 1, rotary_dim] fp32 angles: the first rotary_dim dims
    rotated (in t's dtype, as megatron-core does), the rest passed through."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    return torch.cat((t_rot * cos + rotate_half(t_rot) * sin, t_pass), dim=-1)


def split_freqs(freqs: Freqs) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(q_freqs, k_freqs) from megatron's rotary_pos_emb: a tensor for both, or a pair."""
    return tuple(freqs) if isinstance(freqs, (tuple, list)) else (freqs, freqs)


def qkvg_split_norm_rope_reference(qkvg: Tensor, q_weight: Tensor, k_weight: Tensor,
                                   freqs: Freqs, *, eps: float, silu: bool = False
                                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The contract of `kernels.qk_norm_rope.qkvg_split_norm_rope`, in plain PyTorch."""
    s, b, width = qkvg.shape
    D = q_weight.numel()
    q, k, v, gate = qkvg.view(s, b, width // (QKVG * D), QKVG, D).unbind(dim=3)
    if silu:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k = q_weight * rms_normalize(q, eps), k_weight * rms_normalize(k, eps)
    q_freqs, k_freqs = split_freqs(freqs)
    if q_freqs is not None:
        q, k = apply_rope(q, q_freqs), apply_rope(k, k_freqs)
    return q.contiguous(), k.contiguous(), v.contiguous(), gate.contiguous()
