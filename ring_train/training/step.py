"""One optimizer step over a list of micro-batches, on megatron-core's pipeline schedules."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from kernels.fp8.linear import WEIGHT_CACHE as FP8_WEIGHT_CACHE
from ring_train.data.microbatch import Microbatch
from ring_train.parallel.distributed import device


@dataclass
class StepResult:
    loss: float  # token-weighted mean LM loss over the global batch
    tokens: int  # loss tokens in the global batch
    grad_norm: Optional[float]
    num_zeros_in_grad: Optional[int]
    update_successful: bool


def packed_seq_params(cu_seqlens: Optional[Tensor], seq_length: int) -> Optional[PackedSeqParams]:
    if cu_seqlens is None:
        return None
    cu_seqlens = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        # Positions run over the whole packed row: the rotary table must cover it.
        max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length,
    )


def token_loss(loss_mask: Tensor, per_token_loss: Tensor):
    """Sum of the masked per-token losses and their count; megatron-core divides the gradient
    by the global token count (`calculate_per_token_loss`)."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def forward_step(data_iterator, model):
    batch: Microbatch = next(data_iterator).to(device())
    output = model(
        batch.tokens,
        batch.position_ids,
        None,
        labels=batch.labels,
        loss_mask=batch.loss_mask,
        packed_seq_params=packed_seq_params(batch.cu_seqlens, batch.tokens.shape[1]),
    )
    return output, functools.partial(token_loss, batch.loss_mask)


def _global_loss(reports: List[dict]) -> tuple[float, int]:
    """(mean loss, token count) over the global batch, known on every rank."""
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in reports:
            totals += report["lm loss"].double().cpu()
    totals = totals.to(device())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, count = totals.tolist()
    return loss_sum / max(count, 1.0), int(count)


def _run_schedule(model, microbatches: List[Microbatch], forward_only: bool) -> List[dict]:
    tokens = microbatches[0].tokens
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        # Every virtual stage walks the same micro-batches.
        data_iterator=[iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def train_step(model, optimizer, microbatches: List[Microbatch]) -> StepResult:
    """Forward and backward over `microbatches` (this DP rank's share), then one optimizer step."""
    # Weights changed since the last call (optimizer step, checkpoint load, WSM merge) through
    # buffers autograd does not see; FP8 layers re-quantise them once for this step.
    FP8_WEIGHT_CACHE.invalidate()
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(model, microbatches, forward_only=False)
    update_successful, grad_norm, num_zeros = optimizer.step()
    loss, count = _global_loss(reports)
    return StepResult(loss, count, grad_norm, num_zeros, update_successful)


@torch.no_grad()
def evaluate(model, microbatches: List[Microbatch]) -> tuple[float, int]:
    """(token-weighted mean LM loss, token count) of the global batch, forward only."""
    FP8_WEIGHT_CACHE.invalidate()
    for chunk in model:
        chunk.eval()
    try:
        reports = _run_schedule(model, microbatches, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    return _global_loss(reports)
