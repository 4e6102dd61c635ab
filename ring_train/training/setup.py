"""Model chunks, DDP wrappers and the optimizer, wired the way megatron-core's schedules expect."""

from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from ring_train.config.model import ModelConfig
from ring_train.config.optim import OptimConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import HybridTransformerConfig


def uses_distributed_optimizer(optim: OptimConfig) -> bool:
    if optim.distributed_optimizer is not None:
        return optim.distributed_optimizer
    return optim.optimizer == "adam" and parallel_state.get_data_parallel_world_size() > 1


def build_model_chunks(model: ModelConfig, config: HybridTransformerConfig) -> List[torch.nn.Module]:
    """One model chunk per virtual pipeline stage (one without interleaving), on the device,
    in bf16 (Float16Module) when the config says so."""
    stages = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(stages or 1):
        chunk = build_model(model, config, vp_stage=vp_stage if stages else None)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if config.bf16:
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    return chunks


def wrap_ddp(
    chunks: List[torch.nn.Module], config: HybridTransformerConfig, distributed_optimizer: bool
) -> List[DistributedDataParallel]:
    """DDP wrappers with fp32 gradient buffers; grads are reduced once per step by
    `finalize_model_grads` (set here as the config's hook)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
    )
    model = [
        # Only the first chunk buckets its grads: megatron-core's convention for VPP.
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    return model


def build_optimizer(
    model: List[DistributedDataParallel],
    optim: OptimConfig,
    config: HybridTransformerConfig,
    distributed_optimizer: bool,
) -> MegatronOptimizer:
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=optim.optimizer,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            sgd_momentum=optim.sgd_momentum,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        model,
    )
    config.grad_scale_func = optimizer.scale_loss
    return optimizer
