"""The hybrid model's architecture, named as in the HF `config.json` of Ring-linear-2.0.

Keeping the HF names means a checkpoint's config maps onto this schema field for field (see
ARCH_SPEC §1); megatron-core's `TransformerConfig` is derived from it in
`ring_train.model.transformer_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from ring_train.config.errors import ConfigError

DECAY_VARIANTS = ("A", "B")
MODEL_PRESETS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "model"


def is_softmax_layer(layer: int, num_layers: int, layer_group_size: int) -> bool:
    """Layer `layer` (0-based) is softmax iff it closes a group or is a tail layer beyond the
    last full group (ARCH_SPEC §2.1)."""
    full_groups_end = (num_layers // layer_group_size) * layer_group_size
    return (layer + 1) % layer_group_size == 0 or layer >= full_groups_end


@dataclass
class ModelConfig:
    """Architecture fields have no defaults: `recipes/model/*.yaml` are their one source."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # Key/value heads of the softmax (GQA) layers; lightning layers are MHA with
    # num_attention_heads key/value heads.
    num_key_value_heads: int
    head_dim: int
    # Dense SwiGLU width of the first `first_k_dense_replace` layers.
    intermediate_size: int
    first_k_dense_replace: int
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    moe_intermediate_size: int
    num_shared_experts: int
    routed_scaling_factor: float
    # M lightning layers then one softmax layer: layer_group_size = M + 1.
    # layer_group_size = 1 is the all-softmax Ling-2.0 architecture.
    layer_group_size: int
    # Groups of the lightning output RMSNorm; a group never straddles tensor-parallel ranks.
    group_norm_size: int
    partial_rotary_factor: float
    rope_theta: float
    max_position_embeddings: int
    # Per-layer decay factor f(l) of the lightning slopes (ARCH_SPEC §2.4):
    #   "A": 1 - l/(L-1) + 1e-5      (Megatron reference, SGLang, vLLM: the training stacks)
    #   "B": 1 - (l-1)/(L-1) + 1e-5  (as quoted from the HF remote code)
    decay_variant: str = "A"
    # SiLU on q, k and v of the lightning layers before QK-norm (off in released configs).
    linear_silu: bool = False
    # Lightning state resets at document boundaries of packed sequences, as softmax
    # layers see a document-causal mask.
    reset_state_at_eod: bool = True
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # Aux-loss-free balancing: expert bias step per optimizer step (Ling 2.0: 1e-3, then 1e-4
    # after context extension).
    router_bias_update_rate: float = 1e-3
    router_z_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    # ---- layer pattern -------------------------------------------------------------------------

    def is_softmax_layer(self, layer: int) -> bool:
        return is_softmax_layer(layer, self.num_hidden_layers, self.layer_group_size)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def softmax_layers(self) -> List[int]:
        return [l for l in range(self.num_hidden_layers) if self.is_softmax_layer(l)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    # ---- validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "num_experts",
            "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size",
            "layer_group_size", "group_norm_size", "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive.")
        if self.decay_variant not in DECAY_VARIANTS:
            raise ConfigError(
                f"model.decay_variant={self.decay_variant!r}: must be one of {DECAY_VARIANTS}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}."
            )
        if self.num_attention_heads * self.head_dim % self.group_norm_size:
            raise ConfigError(
                f"model.group_norm_size={self.group_norm_size} must divide the lightning output "
                f"width num_attention_heads*head_dim={self.num_attention_heads * self.head_dim}."
            )
        if self.num_attention_heads % self.group_norm_size:
            raise ConfigError(
                f"model.group_norm_size={self.group_norm_size} must divide "
                f"model.num_attention_heads={self.num_attention_heads} so groups hold whole heads."
            )
        if self.num_experts % self.n_group:
            raise ConfigError(
                f"model.n_group={self.n_group} does not divide model.num_experts={self.num_experts}."
            )
        if self.topk_group > self.n_group:
            raise ConfigError(
                f"model.topk_group={self.topk_group} exceeds model.n_group={self.n_group}."
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"model.num_experts={self.num_experts}."
            )
        # Ling scores a group by the sum of its top-2 biased scores; megatron-core sums the
        # top (topk / topk_group). They agree only when topk == 2 * topk_group.
        if self.n_group > 1 and self.num_experts_per_tok != 2 * self.topk_group:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} must equal "
                f"2 * model.topk_group={2 * self.topk_group}: groups are scored by their top-2 "
                f"experts (set n_group=1 to disable group-limited routing)."
            )
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ConfigError(
                f"model.partial_rotary_factor={self.partial_rotary_factor} must give an even "
                f"rotary dim in (0, head_dim={self.head_dim}]."
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"model.first_k_dense_replace={self.first_k_dense_replace} must be in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]."
            )
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("model.num_nextn_predict_layers must be >= 0.")
        if not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta} must be a positive number.")


def load_model_config(name_or_path: str, **overrides) -> ModelConfig:
    """Reads `recipes/model/<name>.yaml` (or a YAML path) into a validated ModelConfig."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"model config {name_or_path!r} not found ({path}); known: {known}.")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.update(overrides)
    unknown = set(values) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown model config keys {sorted(unknown)} in {path}.")
    return ModelConfig(**values)
