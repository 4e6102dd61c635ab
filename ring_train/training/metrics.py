"""Training metrics: one console line per log interval, `metrics.jsonl`, and wandb.

Only the last rank of the first data-parallel/tensor-parallel group logs (it holds the loss);
wandb runs offline unless the config says online.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

from ring_train.config.schema import LoggingConfig

logger = logging.getLogger("ring_train")


def memory_gib() -> float:
    """Peak device memory on GPU, resident memory on CPU (GiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_config: dict, active: bool):
        self.cfg = cfg
        self.active = active
        # The resolved config, recorded with the metrics and in checkpoints.
        self.run_config = run_config
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.wandb_project, dir=str(run_dir), mode=cfg.wandb_mode,
                config=run_config, resume="allow",
            )

    def log(self, record: dict, console: Optional[str] = None) -> None:
        if not self.active:
            return
        record = {"time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                            step=record.get("global_step"))
        if console:
            logger.info(console)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
