"""Tiny random HF checkpoints of Ling-2.0 and Ring-linear-2.0 in the released on-disk layout.

config.json + `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`, tensor
names and shapes exactly as ARCH_SPEC §4.1 (Ling) / §4.2 (Ring-linear). Weights are random but
non-trivial (norm weights away from 1, expert_bias away from 0) so that a swapped or skipped tensor
changes the logits.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.reference.hf_models import LING_MODEL_TYPE, RING_LINEAR_MODEL_TYPE, head_dims, is_softmax_layer

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_STD = 0.1


def tiny_ling_config(**overrides) -> dict:
    """A small Ling-2.0 config.json dict with the released field set (§1.3).

    Routing keeps the released shape: 4 experts per group so the group score (sum of the top-2
    in each group) differs from a plain group sum, half the groups kept, top-k spread over them."""
    config = {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
            "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
            "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
        },
        "model_type": LING_MODEL_TYPE,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "use_rmsnorm": True,
        "use_qk_norm": True,
        "use_qkv_bias": False,
        "use_bias": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 512,
        "first_k_dense_replace": 1,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "moe_intermediate_size": 32,
        "num_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 32,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "router_dtype": "fp32",
        "num_nextn_predict_layers": 0,
        "mtp_loss_scaling_factor": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "output_dropout": 0.0,
        "eos_token_id": 255,
        "pad_token_id": 255,
        "torch_dtype": "bfloat16",
    }
    return {**config, **overrides}


def tiny_ring_config(**overrides) -> dict:
    """A small Ring-linear-2.0 config.json dict (§1.1) on the tiny Ling backbone.

    5 layers with layer_group_size 2: linear 0, 2; softmax 1, 3 and the tail layer 4 (§2.1).
    Layer 0 is linear with the dense FFN, as in Ring-mini."""
    config = tiny_ling_config(
        architectures=["BailingMoeLinearV2ForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config",
            "AutoModel": "modeling_bailing_moe_linear_v2.BailingMoeLinearV2Model",
            "AutoModelForCausalLM": "modeling_bailing_moe_linear_v2.BailingMoeLinearV2ForCausalLM",
        },
        model_type=RING_LINEAR_MODEL_TYPE,
        num_hidden_layers=5,
        layer_group_size=2,
        group_norm_size=2,
        linear_silu=False,
    )
    return {**config, **overrides}


def hf_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF checkpoint with its shape, in file order (§4.1/§4.2)."""
    d = config["hidden_size"]
    num_heads, num_kv_heads, head_dim = head_dims(config)
    num_layers = config["num_hidden_layers"]
    moe_ffn = config["moe_intermediate_size"]
    shapes = {"model.word_embeddings.weight": (config["vocab_size"], d)}

    def mlp(prefix: str, ffn: int) -> None:
        shapes[f"{prefix}gate_proj.weight"] = (ffn, d)
        shapes[f"{prefix}up_proj.weight"] = (ffn, d)
        shapes[f"{prefix}down_proj.weight"] = (d, ffn)

    def layer(prefix: str, *, softmax: bool, dense_ffn: bool) -> None:
        shapes[f"{prefix}input_layernorm.weight"] = (d,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (d,)
        qkv_heads = num_heads + 2 * num_kv_heads if softmax else 3 * num_heads
        shapes[f"{prefix}attention.query_key_value.weight"] = (qkv_heads * head_dim, d)
        if config["use_qk_norm"]:
            shapes[f"{prefix}attention.query_layernorm.weight"] = (head_dim,)
            shapes[f"{prefix}attention.key_layernorm.weight"] = (head_dim,)
        if not softmax:
            shapes[f"{prefix}attention.g_proj.weight"] = (num_heads * head_dim, d)
            shapes[f"{prefix}attention.g_norm.weight"] = (num_heads * head_dim,)
        shapes[f"{prefix}attention.dense.weight"] = (d, num_heads * head_dim)
        if dense_ffn:
            mlp(f"{prefix}mlp.", config["intermediate_size"])
            return
        shapes[f"{prefix}mlp.gate.weight"] = (config["num_experts"], d)
        if config["moe_router_enable_expert_bias"]:
            shapes[f"{prefix}mlp.gate.expert_bias"] = (config["num_experts"],)
        for expert in range(config["num_experts"]):
            mlp(f"{prefix}mlp.experts.{expert}.", moe_ffn)
        if config["num_shared_experts"] > 0:
            mlp(f"{prefix}mlp.shared_experts.", moe_ffn * config["num_shared_experts"])

    for layer_idx in range(num_layers):
        layer(f"model.layers.{layer_idx}.", softmax=is_softmax_layer(layer_idx, config),
              dense_ffn=layer_idx < config["first_k_dense_replace"])
    if config.get("num_nextn_predict_layers", 0) > 0:
        # MTP exported as an extra softmax MoE layer (LingV2 converter --mtp-as-extra-layer).
        prefix = f"model.layers.{num_layers}."
        shapes[f"{prefix}enorm.weight"] = (d,)
        shapes[f"{prefix}hnorm.weight"] = (d,)
        shapes[f"{prefix}eh_proj.weight"] = (d, 2 * d)
        layer(prefix, softmax=True, dense_ffn=False)
        shapes[f"{prefix}final_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config["vocab_size"], d)
    return shapes


def random_hf_state_dict(config: dict, *, dtype: torch.dtype = torch.bfloat16,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of hf_tensor_shapes(config).

    Matrices ~ N(0, 0.1^2); norm weights 1 + N(0, 0.1^2); expert_bias N(0, 0.1^2) kept fp32 as in
    the released checkpoints (it is an fp32 buffer); everything else in dtype."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in hf_tensor_shapes(config).items():
        noise = torch.randn(shape, generator=generator) * WEIGHT_STD
        if name.endswith("expert_bias"):
            state_dict[name] = noise
        elif name.endswith("norm.weight"):  # every RMSNorm weight: *layernorm, g_norm, enorm, hnorm, model.norm
            state_dict[name] = (1.0 + noise).to(dtype)
        else:
            state_dict[name] = noise.to(dtype)
    return state_dict


def write_ling_checkpoint(directory, config: dict, *, num_shards: int = 3, dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a random Ling-2.0 (`bailing_moe_v2`) HF checkpoint into directory; returns its state dict."""
    return write_random_checkpoint(directory, config, LING_MODEL_TYPE, num_shards=num_shards, dtype=dtype, seed=seed)


def write_ring_linear_checkpoint(directory, config: dict, *, num_shards: int = 3,
                                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a random Ring-linear-2.0 (`bailing_moe_linear`) HF checkpoint into directory; returns its state dict."""
    return write_random_checkpoint(directory, config, RING_LINEAR_MODEL_TYPE, num_shards=num_shards, dtype=dtype,
                                   seed=seed)


def write_random_checkpoint(directory, config: dict, model_type: str, *, num_shards: int, dtype: torch.dtype,
                            seed: int) -> dict[str, torch.Tensor]:
    """random_hf_state_dict written by write_hf_checkpoint, with config.json's torch_dtype set to dtype."""
    if config["model_type"] != model_type:
        raise ValueError(f"model_type={config['model_type']!r}: this writer needs {model_type!r}")
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    return write_hf_checkpoint(directory, config, random_hf_state_dict(config, dtype=dtype, seed=seed), num_shards)


def write_hf_checkpoint(directory, config: dict, state_dict: dict[str, torch.Tensor],
                        num_shards: int = 3) -> dict[str, torch.Tensor]:
    """Write config.json, num_shards safetensors shards (consecutive tensors, near-equal counts)
    and the index {"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}; returns state_dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards={num_shards}: must be between 1 and the {len(names)} tensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    weight_map = {}
    per_shard, extra = divmod(len(names), num_shards)
    start = 0
    for shard in range(num_shards):
        count = per_shard + (1 if shard < extra else 0)
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        shard_names = names[start:start + count]
        save_file({name: state_dict[name].contiguous() for name in shard_names}, directory / filename,
                  metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard_names})
        start += count
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return state_dict


def load_hf_checkpoint(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state_dict) of an HF checkpoint directory: shards listed by an index, or one model.safetensors."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        return config, load_file(directory / "model.safetensors")
    weight_map = json.loads(index_path.read_text())["weight_map"]
    state_dict = {}
    for filename in sorted(set(weight_map.values())):
        shard = load_file(directory / filename)
        misplaced = [name for name in shard if weight_map.get(name) != filename]
        if misplaced:
            raise ValueError(f"{filename} holds {misplaced[:3]} which the index maps elsewhere or not at all")
        state_dict.update(shard)
    missing = set(weight_map) - set(state_dict)
    if missing:
        raise ValueError(f"index lists tensors found in no shard: {sorted(missing)[:3]}")
    return config, state_dict
