"""The unit the data stream hands to the training step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Microbatch:
    """One micro-batch of this data-parallel rank. Shapes [b, s]; `cu_seqlens` [docs + 1]
    marks packed documents (b == 1) and makes attention and lightning state document-local."""

    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    cu_seqlens: Optional[Tensor] = None

    def to(self, device: torch.device) -> "Microbatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Microbatch(*(move(t) for t in (self.tokens, self.labels, self.loss_mask,
                                               self.position_ids, self.cu_seqlens)))
