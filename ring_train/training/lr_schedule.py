"""WSM's learning-rate schedule: linear warmup, then constant (the merge replaces decay)."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def warmup_constant_schedule(
    optimizer: MegatronOptimizer, lr: float, warmup_steps: int, total_steps: int, weight_decay: float
) -> OptimizerParamScheduler:
    """megatron-core's scheduler with a constant style: lr * step / warmup_steps while warming
    up, `lr` after. `step(1)` once per optimizer step; its state goes into checkpoints."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(total_steps, warmup_steps + 1),
        lr_decay_style="constant",
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
