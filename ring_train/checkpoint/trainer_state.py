"""What the training loop needs, besides weights, optimizer and RNG, to continue a run exactly."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict

import torch

from ring_train.checkpoint.errors import CheckpointError


@dataclass
class TrainerState:
    """Saved from rank 0 (every rank must hold the same values). Values must be what
    `torch.load(weights_only=True)` accepts: numbers, strings, None, lists, tuples, dicts and
    tensors."""

    # Optimizer steps completed over the whole run; the checkpoint is named after it.
    step: int
    # The stage being trained (a key of the recipe's `stages`), and its steps completed.
    stage: str = ""
    stage_step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    # The data loader's position as its own state_dict(): a global one (e.g. samples consumed
    # of each dataset, epoch), from which every data-parallel rank derives its share.
    data_loader: Dict[str, Any] = field(default_factory=dict)
    # megatron-core OptimizerParamScheduler.state_dict().
    lr_scheduler: Dict[str, Any] = field(default_factory=dict)
    # The resolved run config, for the record and for checks on resume.
    config: Dict[str, Any] = field(default_factory=dict)
    # Anything else that must survive a restart (skipped-step counters, spike detector, ...).
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainerState":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise CheckpointError(
                f"the checkpoint's trainer state has fields {sorted(unknown)} that this code "
                f"does not know (known: {sorted(known)})."
            )
        return cls(**values)

    def check_loadable(self) -> None:
        """Raise CheckpointError naming the field whose value would save but not load back:
        megatron-core reads this payload with torch.load(weights_only=True)."""
        for name, value in self.to_dict().items():
            buffer = io.BytesIO()
            torch.save(value, buffer)
            buffer.seek(0)
            try:
                torch.load(buffer, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any refusal makes the checkpoint unusable
                raise CheckpointError(
                    f"trainer state field {name!r} holds a value that cannot be loaded back "
                    f"with torch.load(weights_only=True): {exc}. Convert it to numbers, strings, "
                    "lists, dicts or tensors."
                ) from exc
