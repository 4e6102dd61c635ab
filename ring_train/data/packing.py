"""Samples of megatron-core's GPTDataset -> one Microbatch, packed into a single row or not."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from ring_train.data.microbatch import Microbatch


def document_starts(tokens: Tensor, sample_length: int, eod: int) -> Tensor:
    """cu_seqlens of one packed row `tokens` [n]: 0, every sample start (multiples of
    `sample_length`), every position after an EOD, and n; int32, sorted, unique."""
    n = tokens.numel()
    sample_starts = torch.arange(0, n + 1, sample_length)
    after_eod = torch.nonzero(tokens == eod).flatten() + 1
    return torch.unique(torch.cat([sample_starts, after_eod])).to(torch.int32)


def collate(samples: List[Dict[str, Tensor]], pack: bool, eod: int) -> Microbatch:
    """`samples`: b GPTDataset items (tokens, labels, loss_mask of length s).

    pack=False: [b, s] rows, positions 0..s-1 in each, no cu_seqlens.
    pack=True: one [1, b*s] row, positions 0..b*s-1 and cu_seqlens at every sample start and
    after every EOD, so no document or sample shares attention or lightning state with another.
    """
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    loss_mask = torch.stack([s["loss_mask"] for s in samples])
    b, s = tokens.shape
    if not pack:
        positions = torch.arange(s).expand(b, s).contiguous()
        return Microbatch(tokens, labels, loss_mask, positions)
    row = lambda t: t.reshape(1, b * s)
    positions = torch.arange(b * s).unsqueeze(0)
    cu_seqlens = document_starts(tokens.flatten(), s, eod)
    return Microbatch(row(tokens), row(labels), row(loss_mask), positions, cu_seqlens)
