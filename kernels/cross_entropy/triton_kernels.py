"""Triton kernels of the vocab-parallel cross-entropy (contracts: reference.py).

  _row_statistics_kernel  one program per row: an online max / sum-exp sweep over the row's
                          vocabulary shard in BLOCK_V chunks (one read of the logits), and the
                          target's logit
  _logits_grad_kernel     one program per (row, BLOCK_V chunk): exp(x - lse) - onehot(target),
                          times the row's loss gradient, in the logits' dtype (one read, one write)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.fp8.triton_cast import round_to_code
from kernels.triton_support import ROUND_CODES, interpreting

BLOCK_V = 4096
WARPS = 8


@triton.jit
def _row_statistics_kernel(x_ptr, stride_row, V, target_ptr, vocab_start, max_ptr, sum_ptr,
                           target_logit_ptr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    # Per lane: the running max and the sum of exp(x - that max).
    lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + offs < V
        x = tl.load(base + start + offs, mask=mask, other=float("-inf")).to(tl.float32)
        lane_max_new = tl.maximum(lane_max, x)
        # A lane that has seen only masked elements (-inf) subtracts 0: its sum stays 0, no NaN.
        shift = tl.where(lane_max_new == float("-inf"), 0.0, lane_max_new)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        lane_max = lane_max_new
    row_max = tl.max(lane_max, axis=0)
    row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
    local = tl.load(target_ptr + row) - vocab_start
    in_shard = (local >= 0) & (local < V)
    picked = tl.load(base + tl.where(in_shard, local, 0), mask=in_shard, other=0.0)
    tl.store(max_ptr + row, row_max)
    tl.store(sum_ptr + row, row_sum)
    tl.store(target_logit_ptr + row, picked.to(tl.float32))


@triton.jit
def _logits_grad_kernel(x_ptr, stride_row, grad_ptr, stride_grad_row, V, target_ptr,
                        vocab_start, lse_ptr, d_loss_ptr, BLOCK_V: tl.constexpr,
                        ROUND: tl.constexpr, EXACT: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    x = tl.load(x_ptr + row.to(tl.int64) * stride_row + offs, mask=mask, other=0.0)
    p = tl.exp(x.to(tl.float32) - tl.load(lse_ptr + row))
    local = tl.load(target_ptr + row) - vocab_start
    g = (p - tl.where(offs == local, 1.0, 0.0)) * tl.load(d_loss_ptr + row)
    g = round_to_code(g, ROUND, EXACT)
    tl.store(grad_ptr + row.to(tl.int64) * stride_grad_row + offs,
             g.to(grad_ptr.dtype.element_ty), mask=mask)


def row_statistics_triton(logits: Tensor, target: Tensor, vocab_start: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    N, V = logits.shape
    out = torch.empty(3, N, dtype=torch.float32, device=logits.device)
    if N:
        _row_statistics_kernel[(N,)](logits, logits.stride(0), V, target, vocab_start, out[0],
                                     out[1], out[2], BLOCK_V=BLOCK_V, num_warps=WARPS)
    return out[0], out[1], out[2]


def logits_grad_triton(logits: Tensor, lse: Tensor, target: Tensor, vocab_start: int,
                       d_loss: Tensor) -> Tensor:
    N, V = logits.shape
    grad = torch.empty_like(logits)
    if N:
        _logits_grad_kernel[(N, triton.cdiv(V, BLOCK_V))](
            logits, logits.stride(0), grad, grad.stride(0), V, target, vocab_start, lse,
            d_loss, BLOCK_V=BLOCK_V, ROUND=ROUND_CODES[logits.dtype], EXACT=interpreting(),
            num_warps=WARPS)
    return grad
