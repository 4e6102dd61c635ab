"""Parameter counts of a ModelConfig, computed from the architecture alone.

"Active" counts the parameters one token touches: embeddings, attention, dense layers, the
router, the shared expert and `num_experts_per_tok` routed experts per MoE layer, the final norm
and the output head (the convention of the Ring-linear-2.0 model cards).
"""

from __future__ import annotations

from dataclasses import dataclass

from ring_train.config.model import ModelConfig


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int
    # Input embedding plus output head (once when tied).
    embedding: int

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def _swiglu(hidden: int, inner: int) -> int:
    return 3 * hidden * inner


def _lightning_attention(cfg: ModelConfig) -> int:
    width = cfg.num_attention_heads * cfg.head_dim
    qkv = 3 * width * cfg.hidden_size
    gate = width * cfg.hidden_size
    out = cfg.hidden_size * width
    norms = 2 * cfg.head_dim + width  # q/k norm + grouped output norm
    return qkv + gate + out + norms


def _softmax_attention(cfg: ModelConfig) -> int:
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * cfg.hidden_size
    out = cfg.hidden_size * cfg.num_attention_heads * cfg.head_dim
    return qkv + out + 2 * cfg.head_dim


def _moe(cfg: ModelConfig, experts: int) -> int:
    router = cfg.num_experts * cfg.hidden_size
    shared = _swiglu(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
    return router + shared + experts * _swiglu(cfg.hidden_size, cfg.moe_intermediate_size)


def _layer(cfg: ModelConfig, layer: int, experts: int, softmax: bool) -> int:
    attention = _softmax_attention(cfg) if softmax else _lightning_attention(cfg)
    if cfg.is_moe_layer(layer):
        ffn = _moe(cfg, experts)
    else:
        ffn = _swiglu(cfg.hidden_size, cfg.intermediate_size)
    return attention + ffn + 2 * cfg.hidden_size  # + input and post-attention norms


def count_parameters(cfg: ModelConfig, include_mtp: bool = True) -> ParameterCount:
    embedding = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embedding
    total = active = embedding + head + cfg.hidden_size  # + final norm
    for layer in range(cfg.num_hidden_layers):
        softmax = cfg.is_softmax_layer(layer)
        total += _layer(cfg, layer, cfg.num_experts, softmax)
        active += _layer(cfg, layer, cfg.num_experts_per_tok, softmax)
    if include_mtp:
        # An MTP layer: enorm, hnorm, eh_proj [d, 2d], a softmax + MoE decoder layer, final norm.
        mtp_extra = 3 * cfg.hidden_size + 2 * cfg.hidden_size * cfg.hidden_size
        last = cfg.num_hidden_layers  # MTP layers are MoE layers (index >= first_k_dense_replace)
        for _ in range(cfg.num_nextn_predict_layers):
            total += mtp_extra + _layer(cfg, last, cfg.num_experts, softmax=True)
            active += mtp_extra + _layer(cfg, last, cfg.num_experts_per_tok, softmax=True)
    return ParameterCount(total=total, active=active, embedding=embedding + head)
