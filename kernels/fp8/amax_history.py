"""Delayed tensor scaling: the scale of a tensor from the amaxes of earlier tensors of the same site.

Current (just-in-time) tensor scaling reads a tensor twice: an amax sweep, then the cast. Delayed
scaling (Transformer Engine's DelayedScaling with amax_compute_algo "max"; torchao's delayed
scaling) casts with scale = max(amax of the previous `length` tensors of this site) / 448 and
records the tensor's own amax during that same cast, so the tensor is read once. The site is one
operand of one layer (a linear layer's input, or its output gradient): its amax changes slowly from
step to step. Values above the delayed scale's range saturate to +-448, as in both libraries.

The first tensor of a site (empty history) takes its own amax: a one-off current-scaled cast. The
history lives on the tensor's device and is not checkpointed: a resumed run starts it again, which
costs that one current-scaled cast.

`AmaxHistory` keeps `length + 1` slots: quantisation n records its amax into slot
n % (length + 1), zeroed first, and reads the scale from the other `length` slots (slots never
written hold 0, which no max sees).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AmaxHistory", "HistorySlot"]


@dataclass(frozen=True)
class HistorySlot:
    """Where one quantisation reads its amax from and records its own (quantize.py's kernels)."""
    amaxes: Tensor  # fp32 [length + 1] on the tensor's device
    slot: int  # the slot this quantisation records into (zeroed)
    bootstrap: bool  # empty history: the quantisation must take its own amax first


class AmaxHistory:
    """The amax history of one tensor site for delayed tensor scaling (module docstring)."""

    def __init__(self, length: int = 16) -> None:
        if length < 1:
            raise ValueError(f"AmaxHistory length must be >= 1 (the quantisations a scale is "
                             f"taken from), got {length}")
        self.length = length
        self.amaxes: Tensor | None = None
        self.recorded = 0  # quantisations recorded since the history was (re)started

    def _kept_on(self, device: torch.device) -> bool:
        return self.amaxes is not None and self.amaxes.device == device

    def is_empty(self, device: torch.device) -> bool:
        """No amax recorded on `device` yet: the next quantisation is the bootstrap one."""
        return not self._kept_on(device) or self.recorded == 0

    def next_slot(self, device: torch.device) -> HistorySlot:
        """Claims the slot of the next quantisation on `device` (a history restarts when the
        device changes)."""
        if not self._kept_on(device):
            self.amaxes = torch.zeros(self.length + 1, dtype=torch.float32, device=device)
            self.recorded = 0
        slot = self.recorded % (self.length + 1)
        if self.recorded >= self.length + 1:  # the slot holds an amax that left the window
            self.amaxes[slot].zero_()
        self.recorded += 1
        return HistorySlot(self.amaxes, slot, bootstrap=self.recorded == 1)

    def scale_amax(self, s: HistorySlot) -> Tensor:
        """The amax the scale of slot `s`'s quantisation is taken from ([] fp32): the largest of
        the other slots (read before this quantisation records)."""
        return torch.cat((s.amaxes[:s.slot], s.amaxes[s.slot + 1:])).max()
