"""The tiny hybrid model (lightning + softmax layers, dense + MoE FFN, MTP) trained for a few
steps under one parallel layout, from layout-independent global weights and data."""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state

from ring_train.config.compute import ComputeConfig
from ring_train.config.model import load_model_config
from ring_train.config.optim import OptimConfig
from ring_train.config.parallel import ParallelConfig
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import destroy_distributed, init_distributed, pipeline_comm_kwargs
from ring_train.training.setup import build_model_chunks, build_optimizer, wrap_ddp
from ring_train.data.microbatch import Microbatch
from ring_train.training.step import train_step
from ring_train.testing.global_weights import fill_global_weights

SEQ = 32
GLOBAL_BATCH = 4  # sequences per step, micro-batches of one sequence
# Documents packed into each sequence: the lightning state and the softmax mask reset at each.
DOCUMENTS = torch.tensor([0, 7, 20, SEQ], dtype=torch.int32)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    dispatcher: str = "alltoall"
    compute: ComputeConfig = field(default_factory=ComputeConfig)


def global_batch(step: int) -> List[Microbatch]:
    """This data-parallel rank's micro-batches of step `step`."""
    generator = torch.Generator().manual_seed(100 + step)
    vocab = load_model_config("tiny").vocab_size
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.1).float()
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = GLOBAL_BATCH // dp
    return [
        Microbatch(
            tokens=tokens[i : i + 1, :-1],
            labels=tokens[i : i + 1, 1:],
            loss_mask=loss_mask[i : i + 1],
            position_ids=torch.arange(SEQ).unsqueeze(0),
            cu_seqlens=DOCUMENTS,
        )
        for i in range(rank * share, (rank + 1) * share)
    ]


def train(rank: int, layout: Layout, steps: int = 3, probe: Optional[Callable] = None):
    """(loss, grad norm) after each of `steps` optimizer steps; with `probe`, also what
    probe(model chunks) returns after the last step: (history, probe's result)."""
    init_distributed(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                     virtual_pipeline_parallel=layout.vpp, expert_parallel=layout.ep)
    model_cfg = load_model_config("tiny")
    parallel = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                              virtual_pipeline_parallel=layout.vpp, expert_parallel=layout.ep,
                              moe_token_dispatcher=layout.dispatcher)
    config = to_transformer_config(model_cfg, parallel, compute=layout.compute,
                                   **pipeline_comm_kwargs())
    chunks = build_model_chunks(model_cfg, config)
    fill_global_weights(chunks)
    model = wrap_ddp(chunks, config, distributed_optimizer=False)
    # SGD without clipping: an update linear in the gradient. Layouts differ by fp32
    # reduction order (~1e-7); Adam's 1/sqrt(v) turns that noise on near-zero gradients into
    # lr-sized moves, and clipping far below the grad norm amplified it too (measured: up to
    # 6e-6 after 3 steps), which would test their sensitivity instead of the parallel maths.
    optim = OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.0, clip_grad=0.0)
    optimizer = build_optimizer(model, optim, config, distributed_optimizer=False)
    history = []
    for step in range(steps):
        result = train_step(model, optimizer, global_batch(step))
        history.append((result.loss, result.grad_norm))
    probed = probe(chunks) if probe is not None else None
    destroy_distributed()
    return history if probe is None else (history, probed)
