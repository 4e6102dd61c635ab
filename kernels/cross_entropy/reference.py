"""The PyTorch reference of the cross-entropy kernels: per-row statistics of a vocabulary shard of
the logits, and the logits' gradient. fp32 math on any device; the ground truth of
triton_kernels.py and the CPU path.

For logits x [N, V] (V: this rank's vocabulary shard, global ids vocab_start ...) and target ids t:
  row_statistics  m = max_j x_j,  s = sum_j exp(x_j - m),  x_t (0 where t is not in the shard)
  logits_grad     (exp(x - lse) - onehot(t)) * d_loss, rounded to x's dtype
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_statistics_reference(logits: Tensor, target: Tensor, vocab_start: int
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(row max, sum of exp(x - max), target logit) in fp32, each [N]."""
    x = logits.float()
    m = x.amax(dim=1)
    s = torch.exp(x - m[:, None]).sum(dim=1)
    local = target - vocab_start
    in_shard = (local >= 0) & (local < x.shape[1])
    picked = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0]
    return m, s, torch.where(in_shard, picked, torch.zeros_like(picked))


def logits_grad_reference(logits: Tensor, lse: Tensor, target: Tensor, vocab_start: int,
                          d_loss: Tensor) -> Tensor:
    """d loss / d logits [N, V] in logits' dtype, for loss = lse - x_target per row."""
    x = logits.float()
    grad = torch.exp(x - lse[:, None])
    local = target - vocab_start
    rows = torch.arange(x.shape[0], device=x.device)
    in_shard = (local >= 0) & (local < x.shape[1])
    grad[rows[in_shard], local[in_shard]] -= 1.0
    return (grad * d_loss.float()[:, None]).to(logits.dtype)
