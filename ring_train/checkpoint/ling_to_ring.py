"""Ling-2.0 (all softmax, GQA) -> Ring-linear-2.0 (hybrid), in HF layout (ARCH_SPEC §4.3).

Per layer that becomes lightning attention:
  * Q rows are copied; K and V go from KV to H heads by repeating each KV head H/KV times
    consecutively, so query head h keeps its source partner h // (H/KV);
  * the new output gate `g_proj` is initialised fresh (zero: a uniform 0.5 gate at step 0, the
    least disruptive start; or normal with a given std), `g_norm` to ones.
Softmax layers, norms, MoE, embeddings, the head and MTP layers are copied unchanged.

The conversion is a view: each tensor of the hybrid is made when it is asked for, from the
source tensors it needs, so a converter holds one tensor at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

from ring_train.config.model import ModelConfig

GATE_INITS = ("zero", "normal")
_QKV = "attention.query_key_value.weight"
_GATE = "attention.g_proj.weight"
_GATE_NORM = "attention.g_norm.weight"
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class GateInit:
    kind: str = "zero"
    std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GATE_INITS:
            raise ValueError(f"gate init {self.kind!r}: must be one of {GATE_INITS}.")
        if self.kind == "normal" and not self.std > 0:
            raise ValueError(f"gate init std={self.std} must be > 0.")

    def make(self, shape: Tuple[int, ...], layer: int) -> Tensor:
        """A fresh fp32 `g_proj` weight for `layer`."""
        if self.kind == "zero":
            return torch.zeros(shape)
        # Seeded per layer: the conversion is reproducible and independent of tensor order.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer)
        return self.std * torch.randn(shape, generator=generator)


def gqa_qkv_to_mha(qkv: Tensor, cfg: ModelConfig) -> Tensor:
    """[(H + 2KV)*D, d] GQA rows [Q | K | V] -> [3*H*D, d] MHA rows, K/V heads repeated."""
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = qkv.split([h * d, kv * d, kv * d])
    repeat = lambda t: t.view(kv, d, -1).repeat_interleave(h // kv, dim=0).reshape(h * d, -1)
    return torch.cat([q, repeat(k), repeat(v)])


def ring_linear_tensors(
    read: Callable[[str], Tensor], target: ModelConfig, gate: GateInit
) -> Callable[[str], Tensor]:
    """`get(name)`: the HF tensor `name` of the hybrid model `target`, converted from the
    Ling-2.0 tensors `read(name)` returns. New tensors (`g_proj`, `g_norm`) are fp32."""
    width = target.num_attention_heads * target.head_dim

    def get(name: str) -> Tensor:
        match = _LAYER_TENSOR.fullmatch(name)
        # MTP layers (index >= num_hidden_layers) stay softmax.
        if match is None or int(match[1]) >= target.num_hidden_layers:
            return read(name)
        layer, suffix = int(match[1]), match[2]
        if target.is_softmax_layer(layer):
            return read(name)
        if suffix == _QKV:
            return gqa_qkv_to_mha(read(name), target)
        if suffix == _GATE:
            return gate.make((width, target.hidden_size), layer)
        if suffix == _GATE_NORM:
            return torch.ones(width)
        return read(name)

    return get
