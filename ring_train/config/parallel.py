"""Parallel layout and its compatibility with a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Model chunks per pipeline rank (interleaved 1F1B); None = plain 1F1B.
    virtual_pipeline_parallel: Optional[int] = None
    expert_parallel: int = 1
    # Tensor parallelism inside each expert; None = same as tensor_parallel.
    expert_tensor_parallel: Optional[int] = None
    context_parallel: int = 1
    # Only meaningful with tensor_parallel > 1, where megatron-core requires it for MoE.
    sequence_parallel: bool = True
    # MoE token dispatch: "alltoall" or "allgather".
    moe_token_dispatcher: str = "alltoall"

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1.")
        if self.virtual_pipeline_parallel is not None:
            if self.virtual_pipeline_parallel < 1:
                raise ConfigError("parallel.virtual_pipeline_parallel must be >= 1 or null.")
            if self.pipeline_parallel == 1 and self.virtual_pipeline_parallel > 1:
                raise ConfigError(
                    "parallel.virtual_pipeline_parallel > 1 needs parallel.pipeline_parallel > 1."
                )
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ConfigError(
                f"parallel.moe_token_dispatcher={self.moe_token_dispatcher!r}: must be "
                f"'alltoall' or 'allgather'."
            )

    @property
    def uses_sequence_parallel(self) -> bool:
        return self.sequence_parallel and self.tensor_parallel > 1

    @property
    def expert_tensor_parallel_size(self) -> int:
        if self.expert_tensor_parallel is None:
            return self.tensor_parallel
        return self.expert_tensor_parallel

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel


def check_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raises ConfigError naming the field when `parallel` cannot shard `model`."""
    tp = parallel.tensor_parallel
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}; choose a tensor_parallel that divides it."
        )
    if model.num_key_value_heads % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.num_key_value_heads="
            f"{model.num_key_value_heads} (softmax layers shard whole KV heads); use "
            f"tensor_parallel <= {model.num_key_value_heads} that divides it."
        )
    has_lightning_layers = model.layer_group_size > 1
    if has_lightning_layers and model.group_norm_size % tp:
        raise ConfigError(
            f"model.group_norm_size={model.group_norm_size} is not divisible by "
            f"parallel.tensor_parallel={tp}: every rank must hold whole norm groups so the "
            f"grouped RMSNorm needs no all-reduce."
        )
    if model.vocab_size % tp:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor_parallel="
            f"{tp}; pad the vocabulary to a multiple of {tp}."
        )
    stages = parallel.pipeline_parallel * (parallel.virtual_pipeline_parallel or 1)
    if model.num_hidden_layers % stages:
        raise ConfigError(
            f"model.num_hidden_layers={model.num_hidden_layers} is not divisible by "
            f"pipeline_parallel*virtual_pipeline_parallel={stages}."
        )
    if model.num_experts % parallel.expert_parallel:
        raise ConfigError(
            f"parallel.expert_parallel={parallel.expert_parallel} does not divide "
            f"model.num_experts={model.num_experts}."
        )
    if model.moe_intermediate_size % parallel.expert_tensor_parallel_size:
        raise ConfigError(
            f"expert tensor parallel size {parallel.expert_tensor_parallel_size} does not divide "
            f"model.moe_intermediate_size={model.moe_intermediate_size}."
        )
    if model.intermediate_size % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.intermediate_size="
            f"{model.intermediate_size}."
        )
    if tp > 1 and not parallel.sequence_parallel and model.first_k_dense_replace < model.num_hidden_layers:
        raise ConfigError(
            "parallel.sequence_parallel=false with tensor_parallel > 1 and MoE layers: "
            "megatron-core's MoE needs sequence parallelism under tensor parallelism; set "
            "parallel.sequence_parallel=true."
        )
    if parallel.context_parallel > 1:
        raise ConfigError(
            f"parallel.context_parallel={parallel.context_parallel}: context parallelism of the "
            f"lightning layers is not implemented; use context_parallel=1."
        )
