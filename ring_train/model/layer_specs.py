"""megatron-core ModuleSpecs of the hybrid stack: one TransformerLayer spec per layer.

Layer l uses lightning attention unless it closes a group of `layer_group_size` layers (or is a
tail layer), where it uses GQA softmax attention; its FFN is a dense SwiGLU for the first
`first_k_dense_replace` layers and MoE after. All pieces are megatron-core's local (non-TE)
modules except our attention and norms; with `compute.fp8` the linear layers run FP8 GEMMs
(`fp8_linear.py`).
"""

from __future__ import annotations

from typing import List, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from ring_train.config.model import is_softmax_layer
from ring_train.model.experts import GroupedExperts
from ring_train.model.fp8_linear import parallel_linear_classes
from ring_train.model.lightning_attention import LightningAttention, LightningAttentionSubmodules
from ring_train.model.norms import GroupedRMSNorm, RMSNorm
from ring_train.model.router import FusedTopKRouter
from ring_train.model.softmax_attention import SDPAttention
from ring_train.model.transformer_config import HybridTransformerConfig

def lightning_attention_spec(config: HybridTransformerConfig) -> ModuleSpec:
    column, row = parallel_linear_classes(config)
    return ModuleSpec(
        module=LightningAttention,
        submodules=LightningAttentionSubmodules(
            linear_qkvg=column,
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
            out_norm=GroupedRMSNorm,
            linear_proj=row,
        ),
    )


def softmax_attention_spec(config: HybridTransformerConfig) -> ModuleSpec:
    column, row = parallel_linear_classes(config)
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=column,
            core_attention=SDPAttention,
            linear_proj=row,
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
        ),
    )


def dense_mlp_spec(config: HybridTransformerConfig) -> ModuleSpec:
    column, row = parallel_linear_classes(config)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))


def moe_spec(config: HybridTransformerConfig) -> ModuleSpec:
    """megatron's MoELayer with a shared expert. Routed experts: megatron's loop over experts
    (each an MLP of the dense layers' linear classes), or with `grouped_experts` our grouped
    GEMMs over stacked weights (same checkpoint). Router: megatron's, whose gating and routing
    run as fused Triton kernels when `fused_kernels` is on."""
    mlp = dense_mlp_spec(config)
    experts = GroupedExperts if config.grouped_experts else SequentialMLP
    expert_linears = mlp.submodules
    if not config.fp8_routed_experts:  # routed experts in bf16 under an FP8 recipe
        expert_linears = MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                       linear_fc2=RowParallelLinear)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=experts, submodules=expert_linears),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp.submodules),
            router=FusedTopKRouter,
        ),
    )


def _layer_spec(attention: ModuleSpec, mlp: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def hybrid_layer_spec(config: HybridTransformerConfig, layer: int) -> ModuleSpec:
    """The spec of 0-based global layer `layer`."""
    softmax = is_softmax_layer(layer, config.num_layers, config.layer_group_size)
    attention = softmax_attention_spec(config) if softmax else lightning_attention_spec(config)
    mlp = moe_spec(config) if layer >= config.first_k_dense_replace else dense_mlp_spec(config)
    return _layer_spec(attention, mlp)


def hybrid_block_spec(
    config: HybridTransformerConfig, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The decoder layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    specs: List[ModuleSpec] = [hybrid_layer_spec(config, l) for l in range(offset, offset + count)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def mtp_block_spec(
    config: HybridTransformerConfig, vp_stage: Optional[int] = None
) -> Optional[MultiTokenPredictionBlockSubmodules]:
    """MTP layers (softmax attention + MoE, as in Ling 2.0) on the last pipeline stage."""
    count = get_mtp_num_layers_to_build(config, vp_stage=vp_stage)
    if count == 0:
        return None
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=RMSNorm,
            hnorm=RMSNorm,
            eh_proj=ColumnParallelLinear,
            transformer_layer=_layer_spec(softmax_attention_spec(config), moe_spec(config)),
            layer_norm=RMSNorm,
        ),
    )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * count)
