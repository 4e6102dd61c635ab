"""Weight layouts: HuggingFace Bailing (Ling-2.0 / Ring-linear-2.0) <-> this framework.

Works on whole (unsharded) tensors, one decoder layer at a time, so converters can stream.
Framework names are those of the GPTModel state dict at TP = PP = EP = 1; megatron-core's
dist_checkpointing reshards them to any layout.

Layout differences (everything else is a rename):
  * softmax QKV: HF rows [Q heads | K heads | V heads]; megatron interleaves per KV group
    [q_(g,0..n-1), k_g, v_g] for g in KV groups (n = H / KV).
  * lightning QKV + gate: HF `query_key_value` [Q | K | V] and `g_proj`; here one projection
    with rows [q_h, k_h, v_h, g_h] per head h.
  * SwiGLU: HF `gate_proj`, `up_proj`; megatron one `linear_fc1` = [gate; up].
"""

from __future__ import annotations

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


# ---- per-layer mapping -------------------------------------------------------------------------


def _mlp_prefixes(cfg: ModelConfig, layer: int) -> List[Tuple[str, str]]:
    """(framework prefix, HF prefix) of every SwiGLU MLP in the layer's FFN."""
    if not cfg.is_moe_layer(layer):
        return [("mlp", "mlp")]
    experts = [(f"mlp.experts.local_experts.{e}", f"mlp.experts.{e}") for e in range(cfg.num_experts)]
    shared = [("mlp.shared_experts", "mlp.shared_experts")] if cfg.num_shared_experts else []
    return experts + shared


def layer_to_megatron(
    get: Callable[[str], Tensor], cfg: ModelConfig, layer: int, softmax: bool, mtp: bool = False
) -> Iterator[Tuple[str, Tensor]]:
    """Framework (suffix, tensor) pairs of one decoder layer; `get(hf_suffix)` reads HF tensors
    of that layer. `mtp` adds the MTP layer's own norms and projection."""
    renames = _LAYER_RENAMES + (_MOE_RENAMES if cfg.is_moe_layer(layer) else [])
    renames += [] if softmax else _LIGHTNING_RENAMES
    prefix = "transformer_layer." if mtp else ""
    for fw, hf in renames:
        yield prefix + fw, get(hf)
    if mtp:
        for fw, hf in _MTP_RENAMES:
            yield fw, get(hf)
    if softmax:
        yield prefix + "self_attention.linear_qkv.weight", softmax_qkv_to_megatron(
            get("attention.query_key_value.weight"), cfg
        )
    else:
        yield prefix + "self_attention.linear_qkvg.weight", lightning_qkvg_to_megatron(
            get("attention.query_key_value.weight"), get("attention.g_proj.weight"), cfg
        )
    for fw, hf in _mlp_prefixes(cfg, layer):
        yield f"{prefix}{fw}.linear_fc1.weight", torch.cat(
            [get(f"{hf}.gate_proj.weight"), get(f"{hf}.up_proj.weight")]
        )
        yield f"{prefix}{fw}.linear_fc2.weight", get(f"{hf}.down_proj.weight")


def layer_to_hf(
    get: Callable[[str], Tensor], cfg: ModelConfig, layer: int, softmax: bool, mtp: bool = False
) -> Iterator[Tuple[str, Tensor]]:
    """HF (suffix, tensor) pairs of one decoder layer; `get(framework_suffix)` reads ours."""
    renames = _LAYER_RENAMES + (_MOE_RENAMES if cfg.is_moe_layer(layer) else [])
    renames += [] if softmax else _LIGHTNING_RENAMES
    prefix = "transformer_layer." if mtp else ""
    for fw, hf in renames:
        yield hf, get(prefix + fw)
    if mtp:
        for fw, hf in _MTP_RENAMES:
            yield hf, get(fw)
    if softmax:
        yield "attention.query_key_value.weight", softmax_qkv_to_hf(
            get(prefix + "self_attention.linear_qkv.weight"), cfg
        )
    else:
        qkv, gate = lightning_qkvg_to_hf(get(prefix + "self_attention.linear_qkvg.weight"), cfg)
        yield "attention.query_key_value.weight", qkv
        yield "attention.g_proj.weight", gate
    for fw, hf in _mlp_prefixes(cfg, layer):
        gate_proj, up_proj = get(f"{prefix}{fw}.linear_fc1.weight").chunk(2)
        yield f"{hf}.gate_proj.weight", gate_proj
        yield f"{hf}.up_proj.weight", up_proj
        yield f"{hf}.down_proj.weight", get(f"{prefix}{fw}.linear_fc2.weight")


# ---- whole model -------------------------------------------------------------------------------


def _layers(cfg: ModelConfig) -> Iterator[Tuple[int, str, str, bool, bool]]:
    """(layer index, framework prefix, HF prefix, softmax, mtp) of every decoder and MTP layer.
    HF stores MTP layer j as `model.layers.{L + j}`; MTP layers are softmax + MoE."""
    for l in range(cfg.num_hidden_layers):
        yield l, f"decoder.layers.{l}.", f"model.layers.{l}.", cfg.is_softmax_layer(l), False
    for j in range(cfg.num_nextn_predict_layers):
        l = cfg.num_hidden_layers + j
        yield l, f"mtp.layers.{j}.", f"model.layers.{l}.", True, True


def _top_renames(cfg: ModelConfig) -> List[Tuple[str, str]]:
    # A tied output head has no tensor of its own.
    return [(fw, hf) for fw, hf in _TOP_RENAMES if not (cfg.tie_word_embeddings and hf == "lm_head.weight")]


def hf_to_megatron(hf: Mapping[str, Tensor], cfg: ModelConfig) -> StateDict:
    """Whole HF state dict -> framework state dict (TP = PP = EP = 1 names)."""
    out = {fw: hf[name] for fw, name in _top_renames(cfg)}
    for layer, fw_prefix, hf_prefix, softmax, mtp in _layers(cfg):
        get = lambda suffix, p=hf_prefix: hf[p + suffix]
        out.update((fw_prefix + k, v) for k, v in layer_to_megatron(get, cfg, layer, softmax, mtp))
    return out


def megatron_to_hf(sd: Mapping[str, Tensor], cfg: ModelConfig) -> StateDict:
    """Framework state dict (TP = PP = EP = 1 names) -> HF state dict."""
    out = {name: sd[fw] for fw, name in _top_renames(cfg)}
    for layer, fw_prefix, hf_prefix, softmax, mtp in _layers(cfg):
        get = lambda suffix, p=fw_prefix: sd[p + suffix]
        out.update((hf_prefix + k, v) for k, v in layer_to_hf(get, cfg, layer, softmax, mtp))
    return out
