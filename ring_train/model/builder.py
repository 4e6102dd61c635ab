"""Builds the hybrid model (megatron-core's GPTModel with our layer specs and cross-entropy:
language_model.py) for one stage."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state

from ring_train.config.model import ModelConfig
from ring_train.model.language_model import HybridGPTModel
from ring_train.model.layer_specs import hybrid_block_spec, mtp_block_spec
from ring_train.model.transformer_config import HybridTransformerConfig


def build_model(
    model: ModelConfig,
    config: HybridTransformerConfig,
    *,
    vp_stage: Optional[int] = None,
) -> HybridGPTModel:
    """The model chunk of this pipeline rank (and virtual stage `vp_stage`), on the current
    device, with parallel state already initialised."""
    return HybridGPTModel(
        config=config,
        transformer_layer_spec=hybrid_block_spec(config, vp_stage=vp_stage),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=model.partial_rotary_factor,
        rotary_base=int(model.rope_theta),
        mtp_block_spec=mtp_block_spec(config, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
