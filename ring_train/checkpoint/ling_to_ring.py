"""Ling-2.0 (all softmax, GQA) -> Ring-linear-2.0 (hybrid), in HF layout (ARCH_SPEC §4.3).

Per layer that becomes lightning attention:
  * Q rows are copied; K and V go from KV to H heads by repeating each KV head H/KV times
    consecutively, so query head h keeps its source partner h // (H/KV);
  * the new output gate `g_proj` is initialised fresh (zero: a uniform 0.5 gate at step 0, the
    least disruptive start; or normal with a given std), `g_norm` to ones.
Softmax layers, norms, MoE, embeddings and the head are copied unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Tuple

import torch
from torch import Tensor

from ring_train.config.model import ModelConfig

GATE_INITS = ("zero", "normal")


@dataclass(frozen=True)
class GateInit:
    kind: str = "zero"
    std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GATE_INITS:
            raise ValueError(f"gate init {self.kind!r}: must be one of {GATE_INITS}.")

    def make(self, shape: Tuple[int, ...], layer: int, dtype: torch.dtype) -> Tensor:
        if self.kind == "zero":
            return torch.zeros(shape, dtype=dtype)
        # Seeded per layer: the conversion is reproducible and independent of tensor order.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer)
        return (self.std * torch.randn(shape, generator=generator)).to(dtype)


def gqa_qkv_to_mha(qkv: Tensor, cfg: ModelConfig) -> Tensor:
    """[(H + 2KV)*D, d] GQA rows [Q | K | V] -> [3*H*D, d] MHA rows, K/V heads repeated."""
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = qkv.split([h * d, kv * d, kv * d])
    repeat = lambda t: t.view(kv, d, -1).repeat_interleave(h // kv, dim=0).reshape(h * d, -1)
    return torch.cat([q, repeat(k), repeat(v)])


def convert_layer(
    get: Callable[[str], Tensor], cfg: ModelConfig, layer: int, gate: GateInit
) -> Iterator[Tuple[str, Tensor]]:
    """The (HF suffix, tensor) pairs that replace or add to Ling layer `layer`'s tensors
    (`get(suffix)` reads them) to make layer `layer` of the hybrid `cfg`; none for softmax
    layers, which are copied as they are."""
    if cfg.is_softmax_layer(layer):
        return
    qkv = get("attention.query_key_value.weight")
    width = cfg.num_attention_heads * cfg.head_dim
    yield "attention.query_key_value.weight", gqa_qkv_to_mha(qkv, cfg)
    yield "attention.g_proj.weight", gate.make((width, cfg.hidden_size), layer, qkv.dtype)
    yield "attention.g_norm.weight", torch.ones(width, dtype=qkv.dtype)
