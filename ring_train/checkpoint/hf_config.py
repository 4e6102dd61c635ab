"""HF config.json of Ling-2.0 / Ring-linear-2.0 <-> ModelConfig."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict

from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig

LING_ARCHITECTURE = "BailingMoeV2ForCausalLM"
LING_MODEL_TYPE = "bailing_moe_v2"
RING_ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
RING_MODEL_TYPE = "bailing_moe_linear"
# The remote-code classes the released configs name (the modeling files ship with the models).
_AUTO_MAP = {
    LING_MODEL_TYPE: ("configuration_bailing_moe_v2.BailingMoeV2Config",
                      "modeling_bailing_moe_v2.BailingMoeV2"),
    RING_MODEL_TYPE: ("configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config",
                      "modeling_bailing_moe_linear_v2.BailingMoeLinearV2"),
}

# ModelConfig fields with another HF name.
_HF_NAMES = {"init_std": "initializer_range"}
# ModelConfig fields that HF configs do not carry (training-side settings).
_FRAMEWORK_ONLY = {"decay_variant", "reset_state_at_eod", "router_bias_update_rate",
                   "router_z_loss_coeff"}


def is_ring_linear(hf: Dict[str, Any]) -> bool:
    return hf.get("model_type") == RING_MODEL_TYPE


def model_config_from_hf(hf: Dict[str, Any], **framework_fields) -> ModelConfig:
    """ModelConfig of an HF Ling-2.0 (all softmax) or Ring-linear-2.0 config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in (LING_MODEL_TYPE, RING_MODEL_TYPE):
        raise ConfigError(
            f"config.json has model_type={model_type!r} (architectures={hf.get('architectures')}); "
            f"expected {LING_MODEL_TYPE!r} (Ling-2.0) or {RING_MODEL_TYPE!r} (Ring-linear-2.0)."
        )
    unsupported = {
        "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True, "score_function": "sigmoid",
        "norm_topk_prob": True, "rope_scaling": None,
    }
    for key, supported in unsupported.items():
        if key in hf and hf[key] != supported:
            raise ConfigError(f"config.json {key}={hf[key]!r} is not supported (only {supported!r}).")
    values = {}
    for f in fields(ModelConfig):
        if f.name in _FRAMEWORK_ONLY:
            continue
        hf_name = _HF_NAMES.get(f.name, f.name)
        if hf_name in hf and hf[hf_name] is not None:
            values[f.name] = hf[hf_name]
    if hf.get("moe_shared_expert_intermediate_size") not in (
        None, hf["moe_intermediate_size"] * hf.get("num_shared_experts", 0)
    ):
        raise ConfigError(
            "config.json moe_shared_expert_intermediate_size must equal moe_intermediate_size * "
            "num_shared_experts."
        )
    if model_type == LING_MODEL_TYPE:
        # group_norm_size has no use without lightning layers; one group per head keeps it
        # compatible with every tensor-parallel size that divides the heads.
        values.update(layer_group_size=1, group_norm_size=hf["num_attention_heads"])
    if "head_dim" not in values:
        values["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    values.update(framework_fields)
    return ModelConfig(**values)


def model_config_to_hf(cfg: ModelConfig, *, torch_dtype: str = "bfloat16") -> Dict[str, Any]:
    """config.json dict: Ring-linear-2.0, or Ling-2.0 when every layer is softmax."""
    ring = cfg.layer_group_size > 1
    model_type = RING_MODEL_TYPE if ring else LING_MODEL_TYPE
    config_class, modeling = _AUTO_MAP[model_type]
    out: Dict[str, Any] = {
        "architectures": [RING_ARCHITECTURE if ring else LING_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": config_class,
            "AutoModel": f"{modeling}Model",
            "AutoModelForCausalLM": f"{modeling}ForCausalLM",
        },
        "model_type": model_type,
    }
    for f in fields(ModelConfig):
        if f.name in _FRAMEWORK_ONLY or (not ring and f.name in (
            "layer_group_size", "group_norm_size", "linear_silu"
        )):
            continue
        out[_HF_NAMES.get(f.name, f.name)] = getattr(cfg, f.name)
    out.update(
        moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.num_shared_experts,
        hidden_act="silu",
        use_qk_norm=True,
        use_qkv_bias=False,
        use_bias=False,
        use_rmsnorm=True,
        norm_topk_prob=True,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        router_dtype="fp32",
        rope_scaling=None,
        # The framework trains without dropout.
        embedding_dropout=0.0,
        attention_dropout=0.0,
        output_dropout=0.0,
        torch_dtype=torch_dtype,
    )
    return out
