"""megatron-core's TransformerConfig for the hybrid model, derived from a ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from ring_train.config.compute import ComputeConfig
from ring_train.config.model import ModelConfig
from ring_train.config.parallel import ParallelConfig, check_layout


@dataclass
class HybridTransformerConfig(TransformerConfig):
    """TransformerConfig plus the lightning-attention fields (see ModelConfig for each)."""

    layer_group_size: int = 1
    group_norm_size: int = 1
    decay_variant: str = "A"
    linear_silu: bool = False
    reset_state_at_eod: bool = True
    first_k_dense_replace: int = 0
    # ComputeConfig (ring_train/config/compute.py). Named apart from megatron's own `fp8*`
    # fields, which select transformer-engine paths.
    linear_fp8_recipe: Optional[str] = None
    fp8_routed_experts: bool = True
    fused_kernels: bool = False
    grouped_experts: bool = False
    recompute_experts: bool = False


def to_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    compute: Optional[ComputeConfig] = None,
    **overrides,
) -> HybridTransformerConfig:
    """The megatron-core config of `model` under `parallel`.

    `params_dtype` bf16 turns on megatron's bf16 mode (bf16 weights and activations, fp32 main
    grads and optimizer state); fp32 is for tests. `overrides` set any other TransformerConfig
    field (e.g. recompute settings).
    """
    check_layout(model, parallel)
    compute = compute or ComputeConfig()
    bf16 = params_dtype == torch.bfloat16
    kwargs = dict(
        # shape
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.intermediate_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # lightning attention
        layer_group_size=model.layer_group_size,
        group_norm_size=model.group_norm_size,
        decay_variant=model.decay_variant,
        linear_silu=model.linear_silu,
        reset_state_at_eod=model.reset_state_at_eod,
        first_k_dense_replace=model.first_k_dense_replace,
        # compute
        linear_fp8_recipe=None if compute.fp8 == "none" else compute.fp8,
        fp8_routed_experts=compute.fp8_routed_experts,
        fused_kernels=compute.fused_kernels,
        grouped_experts=compute.grouped_experts,
        recompute_experts=compute.recompute_experts,
        # Layers differ (lightning/softmax, dense/MoE): checkpoint keys carry each layer's
        # index instead of stacking layers on one axis.
        hetereogenous_dist_checkpoint=True,
        # MoE: sigmoid router in fp32, aux-loss-free expert bias, group-limited top-k
        num_moe_experts=model.num_experts,
        moe_layer_freq=[int(model.is_moe_layer(l)) for l in range(model.num_hidden_layers)],
        moe_ffn_hidden_size=model.moe_intermediate_size,
        moe_shared_expert_intermediate_size=model.moe_intermediate_size * model.num_shared_experts
        if model.num_shared_experts
        else None,
        moe_router_topk=model.num_experts_per_tok,
        moe_router_num_groups=model.n_group if model.n_group > 1 else None,
        moe_router_group_topk=model.topk_group if model.n_group > 1 else None,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=model.router_bias_update_rate,
        moe_router_topk_scaling_factor=model.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=model.router_z_loss_coeff or None,
        moe_token_dispatcher_type=parallel.moe_token_dispatcher,
        moe_grouped_gemm=False,
        # MTP
        mtp_num_layers=model.num_nextn_predict_layers or None,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
        # parallelism
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.uses_sequence_parallel,
        # precision
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        attention_softmax_in_fp32=True,
        # Loss is summed per token and the gradient divided by the global token count, so every
        # layout (and micro-batch split) optimises the same objective.
        calculate_per_token_loss=True,
        # fused paths that need transformer-engine or apex
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Our two-pass vocab-parallel cross-entropy (kernels/cross_entropy, run by
        # model/language_model.py) goes with the fused kernels.
        cross_entropy_loss_fusion=compute.fused_kernels,
    )
    kwargs.update(overrides)
    return HybridTransformerConfig(**kwargs)
