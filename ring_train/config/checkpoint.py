"""Training checkpoints (where, how often, what to resume) and the WSM merge window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from ring_train.config.errors import ConfigError

LATEST = "latest"
# Decay curves a merge can emulate (ARCH_SPEC §6); "custom" takes explicit `weights`.
WSM_SHAPES = ("uniform", "linear", "1-sqrt", "cosine")
CUSTOM_SHAPE = "custom"
# Explicit merge weights must sum to 1 up to what a YAML list of decimals can express.
WEIGHTS_SUM_TOLERANCE = 1e-6


@dataclass
class CheckpointConfig:
    # Training checkpoints live in <save_dir>/iter_XXXXXXX, with a `latest` tracker file.
    save_dir: str = "${output_dir}/checkpoints"
    # Optimizer steps between periodic saves; 0: no periodic saves (the end of each stage and a
    # preemption still save).
    save_interval: int = 1000
    # Complete training checkpoints kept in save_dir, newest first; None keeps all.
    keep_last: Optional[int] = 3
    # What to resume from: "latest" (the checkpoint save_dir/latest names), a path (a checkpoint
    # directory, or a save directory with a `latest` file), or None (start from initialization).
    load: Optional[str] = LATEST
    # With load="latest" and no checkpoint in save_dir yet: True stops with an error, False starts
    # from initialization and logs so (the first launch of an auto-resuming job). A load path
    # that does not hold a checkpoint is always an error.
    exit_on_missing_checkpoint: bool = False
    # SHA-256 of every file, written into the completion marker on save and compared on load
    # (hashing is spread over the ranks); without it only file sizes are checked and a flipped
    # byte goes unnoticed.
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if not self.save_dir:
            raise ConfigError("checkpoint.save_dir is empty; give the directory to save into.")
        if self.save_interval < 0:
            raise ConfigError(
                f"checkpoint.save_interval={self.save_interval} must be >= 0 (0: no periodic saves)."
            )
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last={self.keep_last} must be >= 1, or null to keep every "
                "checkpoint."
            )
        if self.load is not None and not self.load:
            raise ConfigError(
                "checkpoint.load is empty; use 'latest', a checkpoint path, or null to start from "
                "initialization."
            )


@dataclass
class WSMConfig:
    """Merge window of one stage: `num_candidates` weights-only checkpoints, one every
    `interval_steps` optimizer steps, the last at the stage's final step, merged with the
    weights of a decay `shape` (or explicit `weights`) into the stage's annealed model."""

    interval_steps: int = 500
    num_candidates: int = 8
    # uniform (the plain mean), linear, 1-sqrt, cosine: decay curves turned into merge weights by
    # ring_train.checkpoint.wsm; "custom": the merge weights are `weights`.
    shape: str = "uniform"
    # shape="custom" only: one weight per candidate, oldest first, each >= 0, summing to 1.
    weights: Optional[List[float]] = None

    def __post_init__(self) -> None:
        if self.interval_steps < 1:
            raise ConfigError(f"wsm.interval_steps={self.interval_steps} must be >= 1.")
        if self.num_candidates < 1:
            raise ConfigError(f"wsm.num_candidates={self.num_candidates} must be >= 1.")
        if self.shape == CUSTOM_SHAPE:
            self._check_weights()
        elif self.shape not in WSM_SHAPES:
            raise ConfigError(
                f"wsm.shape={self.shape!r}: must be one of {WSM_SHAPES + (CUSTOM_SHAPE,)}."
            )
        elif self.weights is not None:
            raise ConfigError(
                f"wsm.weights is set but wsm.shape={self.shape!r}; set wsm.shape=custom to merge "
                "with explicit weights, or drop wsm.weights."
            )

    def _check_weights(self) -> None:
        if self.weights is None:
            raise ConfigError("wsm.shape=custom needs wsm.weights (one per candidate, oldest first).")
        if len(self.weights) != self.num_candidates:
            raise ConfigError(
                f"wsm.weights has {len(self.weights)} entries but wsm.num_candidates="
                f"{self.num_candidates}; give one weight per candidate."
            )
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"wsm.weights={list(self.weights)}: every weight must be >= 0.")
        total = math.fsum(self.weights)
        if abs(total - 1.0) > WEIGHTS_SUM_TOLERANCE:
            raise ConfigError(f"wsm.weights={list(self.weights)} sum to {total}, not 1.")

    def window_steps(self) -> int:
        """Optimizer steps the window spans: the stage must be at least this long."""
        return self.num_candidates * self.interval_steps

    def candidate_steps(self, stage_steps: int) -> List[int]:
        """Steps of the stage (1-based count of optimizer steps) after which a candidate is saved,
        oldest first; the last is `stage_steps`."""
        if stage_steps < self.window_steps():
            raise ConfigError(
                f"the WSM window ({self.window_steps()} steps: {self.num_candidates} candidates "
                f"every {self.interval_steps}) is longer than the stage ({stage_steps} steps)."
            )
        return [
            stage_steps - (self.num_candidates - 1 - j) * self.interval_steps
            for j in range(self.num_candidates)
        ]
