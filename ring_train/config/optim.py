"""Optimizer and learning-rate settings (AdamW, warmup then constant LR as WSM prescribes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ring_train.config.errors import ConfigError


OPTIMIZERS = ("adam", "sgd")


@dataclass
class OptimConfig:
    # "adam" is AdamW (decoupled weight decay); "sgd" has momentum `sgd_momentum`.
    optimizer: str = "adam"
    lr: float = 3e-4
    # Linear warmup from 0 to `lr`; constant afterwards: WSM replaces decay by checkpoint merging.
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    # None: on when data parallelism > 1 (Adam only: megatron-core's distributed optimizer
    # supports nothing else).
    distributed_optimizer: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer={self.optimizer!r}: must be one of {OPTIMIZERS}.")
        if self.optimizer != "adam" and self.distributed_optimizer:
            raise ConfigError(
                f"optim.distributed_optimizer=true needs optim.optimizer='adam' (got "
                f"{self.optimizer!r}): megatron-core's distributed optimizer supports only Adam."
            )
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1).")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0 disables).")
