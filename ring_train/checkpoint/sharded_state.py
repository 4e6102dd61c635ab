"""megatron-core sharded state dicts of the model chunks, the optimizer and per-rank state.

Every tensor carries its global shape and this rank's place in it, so dist_checkpointing
writes layout-free global tensors and reads back whatever slice another TP/PP/EP/DP layout
needs.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.module import Float16Module

from ring_train.checkpoint import collective

# The distributed optimizer's default sharding type does not load at all, and
# "dp_reshardable" restores the optimizer state wrongly after a layout change; this one stores
# per-parameter tensors that reshard like the weights.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
RNG_KEY = "rng_state"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP and Float16Module wrappers: the DDP wrapper's state dict would
    prefix every key with `module.`, and then no key of the checkpoint would match."""
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def model_metadata() -> dict:
    """The metadata every `sharded_state_dict` call of the hybrid GPTModel needs."""
    return {
        # The MTP block on a later pipeline stage ties its copy of the embedding over this group.
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        # Layers of the hybrid stack differ (lightning/softmax, dense/MoE): keys carry each
        # layer's index rather than stacking all layers on one axis.
        "non_homogeneous_layers": True,
    }


def model_sharded_state(model: Sequence[torch.nn.Module]) -> Dict[str, ShardedStateDict]:
    """{"model0": ..., "model1": ...}: one entry per virtual pipeline chunk."""
    return {
        f"model{index}": unwrap(chunk).sharded_state_dict(metadata=model_metadata())
        for index, chunk in enumerate(model)
    }


def _zero_momentum_buffers(optimizer: torch.optim.SGD, config=None) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if group["momentum"] and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param.data)


def _give_sgd_a_state_template(optimizer) -> None:
    # megatron-core builds torch SGD without an `init_state_fn`, so a fresh SGD optimizer has
    # no momentum buffers for a checkpoint to be loaded into (its sharded_state_dict raises
    # "'NoneType' object is not callable"). Zero buffers are exact: with dampening 0, SGD's
    # first update from a zero buffer equals its initialisation from the gradient.
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.init_state_fn is None and isinstance(inner.optimizer, torch.optim.SGD):
            inner.init_state_fn = _zero_momentum_buffers


def optimizer_sharded_state(
    optimizer, model_state: Dict[str, ShardedStateDict], is_loading: bool
) -> ShardedStateDict:
    if is_loading:
        _give_sgd_a_state_template(optimizer)
    return optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
    )


def _tensors(state: Any) -> Iterator[ShardedTensor]:
    for value in nested_values(state):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _tensors(built if isinstance(built, (dict, list)) else [built])
        elif isinstance(value, ShardedTensor):
            yield value


def tensor_shapes(state: Any) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Checkpoint key -> (global shape, dtype) of every tensor `state` would save or load, in
    the order of `state`, without modifying it (factories are built on the side)."""
    return {t.key: (tuple(t.global_shape), t.dtype) for t in _tensors(state)}


def object_keys(state: Any) -> List[str]:
    """Checkpoint keys of the ShardedObjects in `state` (e.g. modules' `_extra_state`)."""
    return [v.unique_key for v in nested_values(state) if isinstance(v, ShardedObject)]


def rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    """This rank's RNG state as one shard of a per-rank object (`state` None: a template to
    load into)."""
    return ShardedObject(
        RNG_KEY, state, (collective.world_size(),), (collective.rank(),), replica_id=0
    )


def current_layout() -> Dict[str, Optional[int]]:
    """The parallel layout of this job. Per-rank state (RNG) only carries over to the same one."""
    return {
        "world_size": collective.world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_parallel": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel": parallel_state.get_expert_tensor_parallel_world_size(),
        "context_parallel": parallel_state.get_context_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }
