"""Vocab-parallel cross-entropy in two passes over the logits, without fp32 copies of them.

    loss = vocab_parallel_cross_entropy(logits [..., V_shard], target [...], tp_group)  fp32 [...]

The logits are sharded over the vocabulary across the tensor-parallel group, as megatron-core's
output layer leaves them; target holds global token ids. Forward reads the logits once per row
for its max, sum of exp (an online softmax) and the target's logit, then combines the shards with
two all-reduces of [N] fp32 (max; rescaled sums and target logits): loss = max + log(sum) - x_t.
Backward reads them once more and writes the gradient (softmax - onehot) x d_loss in the logits'
dtype. Nothing but the logits (kept by reference) and the per-row log-sum-exp is saved.

megatron-core's cross-entropies (`tensor_parallel.vocab_parallel_cross_entropy`, and the fused one
with cross_entropy_loss_fusion) compute the same fp32 math, but on an fp32 copy of the logits, and
keep an fp32 softmax of the whole shard for backward: for Ring's 157K vocabulary ~2.6 GB per 4K
tokens, and several passes over it. The Triton kernels (triton_kernels.py) run on CUDA tensors, or
on CPU tensors under TRITON_INTERPRET=1; otherwise the PyTorch reference (reference.py) runs.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.triton_support import use_triton

from .reference import logits_grad_reference, row_statistics_reference

__all__ = ["vocab_parallel_cross_entropy"]

logger = logging.getLogger(__name__)


def _row_statistics(logits: Tensor, target: Tensor, vocab_start: int):
    if use_triton(logits, "cross-entropy", logger):
        from .triton_kernels import row_statistics_triton

        return row_statistics_triton(logits, target, vocab_start)
    return row_statistics_reference(logits, target, vocab_start)


def _logits_grad(logits: Tensor, lse: Tensor, target: Tensor, vocab_start: int,
                 d_loss: Tensor) -> Tensor:
    if use_triton(logits, "cross-entropy", logger):
        from .triton_kernels import logits_grad_triton

        return logits_grad_triton(logits, lse, target, vocab_start, d_loss)
    return logits_grad_reference(logits, lse, target, vocab_start, d_loss)


def _shard(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) of this process in the vocabulary's tensor-parallel group."""
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group) -> Tensor:
        shape, V = logits.shape[:-1], logits.shape[-1]
        x = logits.reshape(-1, V)
        if x.stride(1) != 1:
            x = x.contiguous()
        t = target.reshape(-1).to(device=x.device, dtype=torch.int64).contiguous()
        rank, size = _shard(tp_group)
        vocab_start = rank * V
        row_max, row_sum, target_logit = _row_statistics(x, t, vocab_start)
        if size > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack((row_sum * torch.exp(row_max - global_max), target_logit))
            dist.all_reduce(sums, group=tp_group)
            row_max, (row_sum, target_logit) = global_max, sums
        lse = row_max + torch.log(row_sum)
        ctx.save_for_backward(x, lse, t)
        ctx.vocab_start, ctx.logits_shape = vocab_start, logits.shape
        return (lse - target_logit).view(shape)

    @staticmethod
    def backward(ctx, d_loss: Tensor):
        x, lse, t = ctx.saved_tensors
        d = d_loss.reshape(-1).float().contiguous()
        grad = _logits_grad(x, lse, t, ctx.vocab_start, d)
        return grad.view(ctx.logits_shape), None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor,
                                 tp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Per-token cross-entropy (fp32, target's shape) of logits [..., V_shard] whose last dim is
    this rank's contiguous 1/tp share of the vocabulary (rank r holds ids r*V_shard ...);
    target [...] global ids. tp_group: the vocabulary's tensor-parallel group (None: unsharded).
    The logits' gradient comes in their dtype."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross-entropy needs logits [..., V] and target [...] with the same "
                         f"leading shape; got logits {tuple(logits.shape)}, target "
                         f"{tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)
