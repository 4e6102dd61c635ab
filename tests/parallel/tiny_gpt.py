"""A tiny megatron-core GPTModel (local spec) trained for a few steps under a given layout.

Every layout starts from the same layout-independent global weights (`fill_global_weights`),
so a TP/PP/EP/DP run and the single-process run hold the same model, and their losses and grad
norms after each step must agree to fp32 round-off.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from ring_train.parallel.distributed import init_distributed, pipeline_comm_kwargs
from ring_train.testing.global_weights import fill_global_weights

VOCAB = 128
SEQ = 16
GLOBAL_BATCH = 4  # sequences per step; micro-batches of one sequence

# per optimizer step: the global loss (None off the last pipeline stage) and the grad norm
History = List[Dict[str, Optional[float]]]

# The default distributed-optimizer format does not load; this one reshards across layouts.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    moe: bool = False
    dispatcher: str = "alltoall"
    distopt: bool = False
    num_layers: int = 2
    # extra ModelParallelConfig/TransformerConfig fields, e.g. {"batch_p2p_comm": True}
    config_overrides: Dict[str, object] = field(default_factory=dict)

    @property
    def model_kind(self) -> str:
        """Layouts of one kind hold the same global model and must give the same numbers."""
        return f"{'moe' if self.moe else 'dense'}-{self.num_layers}layers"


def transformer_config(layout: Layout) -> TransformerConfig:
    moe = {}
    if layout.moe:
        moe = dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none",
            moe_token_dispatcher_type=layout.dispatcher,
            moe_grouped_gemm=False,
            moe_ffn_hidden_size=64,
        )
    return TransformerConfig(
        num_layers=layout.num_layers,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        sequence_parallel=layout.tp > 1,
        **moe,
        **{**pipeline_comm_kwargs(), **layout.config_overrides},
    )


def build_model(config: TransformerConfig, layout: Layout) -> List[GPTModel]:
    """One GPTModel per virtual pipeline stage (a single one without VPP)."""
    spec = get_gpt_layer_local_spec(
        num_experts=4 if layout.moe else None, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    vp_stages = range(layout.vpp) if layout.vpp else [None]
    return [
        GPTModel(
            config,
            spec,
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            position_embedding_type="rope",
            vp_stage=vp,
        )
        for vp in vp_stages
    ]


def batch(step: int) -> torch.Tensor:
    """This data-parallel rank's share of step `step`'s global batch: [b, SEQ + 1] tokens."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp_size
    return tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(inputs)
    output = model(inputs, positions, attention_mask=None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # clone: the schedule divides the returned loss in place by the micro-batch count
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


@dataclass
class Trainer:
    model: List[DistributedDataParallel]  # one per virtual pipeline stage
    optimizer: object


def build_trainer(layout: Layout) -> Trainer:
    """Parallel groups, model (global weights filled in), DDP wrappers and optimizer."""
    init_distributed(
        tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp,
        virtual_pipeline_parallel=layout.vpp,
        expert_parallel=layout.ep,
    )
    config = transformer_config(layout)
    chunks = build_model(config, layout)
    fill_global_weights(chunks)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=layout.distopt)
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.0,
            clip_grad=1.0,
            use_distributed_optimizer=layout.distopt,
            params_dtype=torch.float32,
        ),
        model,
    )
    return Trainer(model, optimizer)


def train_step(trainer: Trainer, step: int) -> Dict[str, Optional[float]]:
    """One optimizer step; returns the global loss (on last-stage ranks) and grad norm."""
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    data = batch(step)
    num_microbatches = data.shape[0]
    iterators = [iter(data.split(1)) for _ in trainer.model]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=trainer.model if len(trainer.model) > 1 else trainer.model[0],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=1,
    )
    _, grad_norm, _ = trainer.optimizer.step()
    loss = None
    if parallel_state.is_pipeline_last_stage():
        mean = torch.stack([item["loss"] for item in losses]).mean()
        torch.distributed.all_reduce(mean, group=parallel_state.get_data_parallel_group())
        loss = mean.item() / parallel_state.get_data_parallel_world_size()
    return {"loss": loss, "grad_norm": float(grad_norm)}


def train(layout: Layout, steps: int = 3) -> History:
    trainer = build_trainer(layout)
    history = [train_step(trainer, step) for step in range(steps)]
    parallel_state.destroy_model_parallel()
    return history


def save_checkpoint(trainer: Trainer, directory: str) -> None:
    model_state = sharded_model_state(trainer)
    state = {
        "model": model_state,
        "optimizer": trainer.optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA),
    }
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(state, directory)


def load_checkpoint(trainer: Trainer, directory: str) -> None:
    model_state = sharded_model_state(trainer)
    template = {
        "model": model_state,
        "optimizer": trainer.optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=OPTIMIZER_METADATA
        ),
    }
    loaded = dist_checkpointing.load(template, directory)
    for i, chunk in enumerate(trainer.model):
        chunk.module.load_state_dict(loaded["model"][f"model{i}"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])


def sharded_model_state(trainer: Trainer) -> dict:
    # The DDP wrapper would prefix every key with `module.`; load_state_dict then finds none.
    return {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(trainer.model)}


def train_resumed(save_layout: Layout, load_layout: Layout, directory: str, steps=3) -> History:
    """Step 0 under `save_layout`, checkpoint, then steps 1.. under `load_layout` from it."""
    trainer = build_trainer(save_layout)
    train_step(trainer, 0)
    save_checkpoint(trainer, directory)
    parallel_state.destroy_model_parallel()
    trainer = build_trainer(load_layout)
    load_checkpoint(trainer, directory)
    history = [train_step(trainer, step) for step in range(1, steps)]
    parallel_state.destroy_model_parallel()
    return history
