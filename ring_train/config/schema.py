"""The root training config: a recipe is a model, a layout, an optimizer, data and a list of
stages, each stage ending with a WSM checkpoint merge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from ring_train.config.checkpoint import CheckpointConfig, WSMConfig
from ring_train.config.compute import ComputeConfig
from ring_train.config.data import DataConfig
from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig
from ring_train.config.optim import OptimConfig
from ring_train.config.parallel import ParallelConfig, check_layout

PRECISIONS = ("bf16", "fp32")


@dataclass
class StageConfig:
    """One training stage (e.g. 4K continued training, 32K / 128K mid-training)."""

    seq_length: int
    global_batch_size: int
    micro_batch_size: int = 1
    # Budget: exactly one of train_steps / train_tokens.
    train_steps: Optional[int] = None
    train_tokens: Optional[int] = None
    # Constant LR of the stage (WSM: no decay; the merge anneals), reached after warmup_steps.
    lr: float = 3e-4
    warmup_steps: int = 0
    # RoPE base for this context length; None keeps the model's rope_theta.
    rope_theta: Optional[float] = None
    # Expert-bias step (Ling 2.0: 1e-3, then 1e-4 after context extension); None keeps the model's.
    router_bias_update_rate: Optional[float] = None
    # Data of this stage; None keeps the recipe's data.
    data: Optional[DataConfig] = None
    # Layout of this stage; None keeps the recipe's parallel layout.
    parallel: Optional[ParallelConfig] = None
    wsm: WSMConfig = field(default_factory=WSMConfig)
    # Validation micro-batches evaluated at the stage's start and on its merged model.
    eval_microbatches: int = 8

    def validate(self, name: str) -> None:
        where = f"stages.{name}"
        for key in ("seq_length", "global_batch_size", "micro_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}={getattr(self, key)} must be positive.")
        if (self.train_steps is None) == (self.train_tokens is None):
            raise ConfigError(
                f"{where}: set exactly one of train_steps and train_tokens "
                f"(got train_steps={self.train_steps}, train_tokens={self.train_tokens})."
            )
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: lr must be > 0 and warmup_steps >= 0.")
        if self.steps() < self.wsm.window_steps():
            raise ConfigError(
                f"{where}: the WSM window ({self.wsm.window_steps()} steps: "
                f"{self.wsm.num_candidates} candidates every {self.wsm.interval_steps}) is longer "
                f"than the stage ({self.steps()} steps); shorten the window or lengthen the stage."
            )

    def steps(self) -> int:
        """Optimizer steps of the stage."""
        if self.train_steps is not None:
            return self.train_steps
        tokens_per_step = self.global_batch_size * self.seq_length
        return -(-self.train_tokens // tokens_per_step)


@dataclass
class LoggingConfig:
    log_interval: int = 1
    # wandb: "offline" (default: clusters often have no internet), "online", or "disabled".
    wandb_mode: str = "offline"
    wandb_project: str = "ring-train"
    # Peak dense bf16 TFLOP/s of one device for MFU; None: known GPUs are looked up, else no MFU.
    peak_tflops: Optional[float] = None

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(
                f"logging.wandb_mode={self.wandb_mode!r}: use offline, online or disabled."
            )
        if self.log_interval <= 0:
            raise ConfigError(f"logging.log_interval={self.log_interval} must be positive.")


@dataclass
class TrainConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # Stages run in insertion order; each starts from the previous stage's merged model.
    stages: Dict[str, StageConfig] = field(default_factory=dict)
    # Run only this stage (its predecessor's merged model must exist); None: all, resuming.
    stage: Optional[str] = None
    # Weights the first stage starts from (e.g. a converted Ling checkpoint); None: random init.
    init_from: Optional[str] = None
    recipe: str = "custom"
    precision: str = "bf16"
    seed: int = 1234
    output_dir: str = "runs/${recipe}"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: must be one of {PRECISIONS}.")
        if self.compute.fp8 != "none" and self.precision != "bf16":
            raise ConfigError(
                f"compute.fp8={self.compute.fp8} needs precision=bf16 (FP8 GEMMs take bf16 "
                f"activations), got precision={self.precision}."
            )
        if not self.stages:
            raise ConfigError("stages: a recipe needs at least one stage.")
        if self.stage is not None and self.stage not in self.stages:
            raise ConfigError(f"stage={self.stage!r} is not a stage of the recipe: {list(self.stages)}.")
        for name, stage in self.stages.items():
            stage.validate(name)
            parallel = stage.parallel or self.parallel
            check_layout(self.model, parallel)
            if self.compute.grouped_experts and parallel.expert_tensor_parallel_size != 1:
                raise ConfigError(
                    f"compute.grouped_experts needs expert tensor parallelism 1 (stage {name} has "
                    f"{parallel.expert_tensor_parallel_size}: it defaults to tensor_parallel); set "
                    f"parallel.expert_tensor_parallel=1 or compute.grouped_experts=false."
                )
            data = stage.data or self.data
            if data.reset_state_at_eod != self.model.reset_state_at_eod:
                raise ConfigError(
                    f"data.reset_state_at_eod={data.reset_state_at_eod} (stage {name}) differs "
                    f"from model.reset_state_at_eod={self.model.reset_state_at_eod}: packed "
                    f"documents and the lightning state reset must agree; set both the same."
                )
