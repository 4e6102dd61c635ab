"""Weight layouts: HuggingFace Bailing (Ling-2.0 / Ring-linear-2.0) <-> this framework.

Works on whole (unsharded) tensors, one tensor at a time, so converters can stream.
Framework names are those of the GPTModel state dict at TP = PP = EP = 1; megatron-core's
dist_checkpointing reshards them to any layout.

Every framework tensor is made of one or more HF tensors (a `TensorMap`); the layouts differ
only in these (everything else is a rename):
  * softmax QKV: HF rows [Q heads | K heads | V heads]; megatron interleaves per KV group
    [q_(g,0..n-1), k_g, v_g] for g in KV groups (n = H / KV).
  * lightning QKV + gate: HF `query_key_value` [Q | K | V] and `g_proj`; here one projection
    with rows [q_h, k_h, v_h, g_h] per head h.
  * SwiGLU: HF `gate_proj`, `up_proj`; megatron one `linear_fc1` = [gate; up].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Tuple

import torch
from torch import Tensor

from ring_train.config.model import ModelConfig

StateDict = Dict[str, Tensor]

# (framework suffix, HF suffix) pairs that are pure renames inside a decoder layer.
_LAYER_RENAMES = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.q_layernorm.weight", "attention.query_layernorm.weight"),
    ("self_attention.k_layernorm.weight", "attention.key_layernorm.weight"),
    ("self_attention.linear_proj.weight", "attention.dense.weight"),
]
_LIGHTNING_RENAMES = [("self_attention.out_norm.weight", "attention.g_norm.weight")]
_MOE_RENAMES = [
    ("mlp.router.weight", "mlp.gate.weight"),
    ("mlp.router.expert_bias", "mlp.gate.expert_bias"),
]
_MTP_RENAMES = [
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("final_layernorm.weight", "final_layernorm.weight"),
]
_TOP_RENAMES = [
    ("embedding.word_embeddings.weight", "model.word_embeddings.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
]


# ---- tensor transforms -------------------------------------------------------------------------


def softmax_qkv_to_megatron(w: Tensor, cfg: ModelConfig) -> Tensor:
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = w.split([h * d, kv * d, kv * d])
    groups = [q.view(kv, h // kv, d, -1), k.view(kv, 1, d, -1), v.view(kv, 1, d, -1)]
    return torch.cat(groups, dim=1).reshape(-1, w.shape[-1])


def softmax_qkv_to_hf(w: Tensor, cfg: ModelConfig) -> Tensor:
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    grouped = w.view(kv, h // kv + 2, d, -1)
    q, k, v = grouped.split([h // kv, 1, 1], dim=1)
    return torch.cat([t.reshape(-1, w.shape[-1]) for t in (q, k, v)])


def lightning_qkvg_to_megatron(qkv: Tensor, gate: Tensor, cfg: ModelConfig) -> Tensor:
    h, d = cfg.num_attention_heads, cfg.head_dim
    parts = torch.cat([qkv.view(3, h, d, -1), gate.view(1, h, d, -1)])  # [4, H, D, hidden]
    return parts.transpose(0, 1).reshape(-1, qkv.shape[-1])


def lightning_qkvg_to_hf(w: Tensor, cfg: ModelConfig) -> Tuple[Tensor, Tensor]:
    h, d = cfg.num_attention_heads, cfg.head_dim
    parts = w.view(h, 4, d, -1).transpose(0, 1)  # [4, H, D, hidden]
    return parts[:3].reshape(-1, w.shape[-1]), parts[3].reshape(-1, w.shape[-1])


# ---- one framework tensor <-> its HF tensors ---------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    """Framework tensor `framework` is `to_megatron(*HF tensors named hf)`, and
    `to_hf(framework tensor)` gives those HF tensors back, in the order of `hf`."""

    framework: str
    hf: Tuple[str, ...]
    to_megatron: Callable[..., Tensor]
    to_hf: Callable[[Tensor], Tuple[Tensor, ...]]

    def prefixed(self, framework_prefix: str, hf_prefix: str) -> "TensorMap":
        return TensorMap(
            framework_prefix + self.framework,
            tuple(hf_prefix + name for name in self.hf),
            self.to_megatron,
            self.to_hf,
        )


def _rename(framework: str, hf: str) -> TensorMap:
    return TensorMap(framework, (hf,), lambda t: t, lambda t: (t,))


def _swiglu(framework_prefix: str, hf_prefix: str) -> List[TensorMap]:
    return [
        TensorMap(
            f"{framework_prefix}.linear_fc1.weight",
            (f"{hf_prefix}.gate_proj.weight", f"{hf_prefix}.up_proj.weight"),
            lambda gate, up: torch.cat([gate, up]),
            lambda fc1: tuple(fc1.chunk(2)),
        ),
        _rename(f"{framework_prefix}.linear_fc2.weight", f"{hf_prefix}.down_proj.weight"),
    ]


def _mlp_prefixes(cfg: ModelConfig, layer: int) -> List[Tuple[str, str]]:
    """(framework prefix, HF prefix) of every SwiGLU MLP in the layer's FFN."""
    if not cfg.is_moe_layer(layer):
        return [("mlp", "mlp")]
    experts = [(f"mlp.experts.local_experts.{e}", f"mlp.experts.{e}") for e in range(cfg.num_experts)]
    shared = [("mlp.shared_experts", "mlp.shared_experts")] if cfg.num_shared_experts else []
    return experts + shared


def layer_maps(cfg: ModelConfig, layer: int, softmax: bool, mtp: bool = False) -> List[TensorMap]:
    """The TensorMaps of one decoder layer, names relative to the layer. `mtp` adds the MTP
    layer's own norms and projection; its decoder layer sits under `transformer_layer.`."""
    renames = _LAYER_RENAMES + (_MOE_RENAMES if cfg.is_moe_layer(layer) else [])
    renames += [] if softmax else _LIGHTNING_RENAMES
    maps = [_rename(fw, hf) for fw, hf in renames]
    if softmax:
        maps.append(TensorMap(
            "self_attention.linear_qkv.weight",
            ("attention.query_key_value.weight",),
            lambda qkv: softmax_qkv_to_megatron(qkv, cfg),
            lambda w: (softmax_qkv_to_hf(w, cfg),),
        ))
    else:
        maps.append(TensorMap(
            "self_attention.linear_qkvg.weight",
            ("attention.query_key_value.weight", "attention.g_proj.weight"),
            lambda qkv, gate: lightning_qkvg_to_megatron(qkv, gate, cfg),
            lambda w: lightning_qkvg_to_hf(w, cfg),
        ))
    for fw, hf in _mlp_prefixes(cfg, layer):
        maps += _swiglu(fw, hf)
    if mtp:
        maps = [m.prefixed("transformer_layer.", "") for m in maps]
        maps += [_rename(fw, hf) for fw, hf in _MTP_RENAMES]
    return maps


# ---- whole model -------------------------------------------------------------------------------


def _layers(cfg: ModelConfig) -> Iterator[Tuple[int, str, str, bool, bool]]:
    """(layer index, framework prefix, HF prefix, softmax, mtp) of every decoder and MTP layer.
    HF stores MTP layer j as `model.layers.{L + j}`; MTP layers are softmax + MoE."""
    for l in range(cfg.num_hidden_layers):
        yield l, f"decoder.layers.{l}.", f"model.layers.{l}.", cfg.is_softmax_layer(l), False
    for j in range(cfg.num_nextn_predict_layers):
        l = cfg.num_hidden_layers + j
        yield l, f"mtp.layers.{j}.", f"model.layers.{l}.", True, True


def model_maps(cfg: ModelConfig) -> List[TensorMap]:
    """Every TensorMap of the model, with full names, in HF file order (embedding, layers,
    final norm, head)."""
    # A tied output head has no tensor of its own.
    top = [_rename(fw, hf) for fw, hf in _TOP_RENAMES
           if not (cfg.tie_word_embeddings and hf == "lm_head.weight")]
    maps = top[:1]
    for layer, fw_prefix, hf_prefix, softmax, mtp in _layers(cfg):
        maps += [m.prefixed(fw_prefix, hf_prefix) for m in layer_maps(cfg, layer, softmax, mtp)]
    return maps + top[1:]


def hf_to_megatron(hf: Mapping[str, Tensor], cfg: ModelConfig) -> StateDict:
    """Whole HF state dict -> framework state dict (TP = PP = EP = 1 names)."""
    return {m.framework: m.to_megatron(*(hf[name] for name in m.hf)) for m in model_maps(cfg)}


def megatron_to_hf(sd: Mapping[str, Tensor], cfg: ModelConfig) -> StateDict:
    """Framework state dict (TP = PP = EP = 1 names) -> HF state dict."""
    out: StateDict = {}
    for m in model_maps(cfg):
        out.update(zip(m.hf, m.to_hf(sd[m.framework])))
    return out
