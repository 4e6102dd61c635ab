"""What a checkpoint of a model holds, learnt without allocating the model.

The model is built on the meta device in a job of one process (TP = PP = EP = 1): its sharded
state dict gives every checkpoint key with its global shape and dtype, and the non-tensor
entries it saves. Those keys are layout-free, so a checkpoint written with them loads at any
layout. Framework state-dict names (`hf_layout`) map onto them one to one, except that the
experts of a layer are stacked on a leading axis under one key.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.hf_layout import TensorMap, model_maps
from ring_train.checkpoint.sharded_state import model_metadata, tensor_shapes
from ring_train.checkpoint.streaming import TensorInfo
from ring_train.config.model import ModelConfig
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import destroy_distributed, init_distributed

_LOCAL_EXPERT = re.compile(r"(.+\.experts\.)local_experts\.(\d+)\.(.+)")


@dataclass
class CheckpointEntries:
    tensors: Dict[str, TensorInfo]  # checkpoint key -> global shape, dtype
    # checkpoint key -> the model's non-tensor entry (`_extra_state`) as megatron-core's
    # torch_dist format stores it: the list of the payloads under that key
    objects: Dict[str, Any]
    framework: Dict[str, TensorInfo]  # framework state-dict name (TP = 1) -> shape, dtype


@contextlib.contextmanager
def _model_parallel_of_one() -> Iterator[None]:
    """megatron-core parallel state of a job of one process, for the time of the block."""
    if parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if sizes != (1, 1, 1):
            raise CheckpointError(
                f"checkpoint conversion runs in a process of its own; this one is a rank of a "
                f"job with TP, PP, EP = {sizes}."
            )
        yield
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise CheckpointError(
            f"checkpoint conversion runs in a process of its own; this one is a rank of a job "
            f"of {dist.get_world_size()} processes."
        )
    joined = dist.is_initialized()
    init_distributed()
    try:
        yield
    finally:
        if joined:
            parallel_state.destroy_model_parallel()
        else:
            destroy_distributed()


def checkpoint_entries(cfg: ModelConfig, dtype: torch.dtype) -> CheckpointEntries:
    """The entries of a checkpoint of `cfg` trained with parameters in `dtype` (buffers that
    the model keeps in fp32, the router's expert bias, stay fp32)."""
    # Building seeds torch's generators; the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]), _model_parallel_of_one():
        config = to_transformer_config(cfg, ParallelConfig(), params_dtype=dtype)
        with torch.device("meta"):
            model = build_model(cfg, config)
        sharded = model.sharded_state_dict(metadata=model_metadata())
        objects = {
            value.unique_key: [value.data]
            for value in nested_values(sharded)
            if isinstance(value, ShardedObject)
        }
        framework = {
            name: (tuple(value.shape), value.dtype)
            for name, value in model.state_dict().items()
            if isinstance(value, torch.Tensor)
        }
        return CheckpointEntries(tensor_shapes(sharded), objects, framework)


def checkpoint_key(framework_name: str) -> Tuple[str, Optional[int]]:
    """(checkpoint key, index on its expert axis or None) of a framework state-dict name."""
    match = _LOCAL_EXPERT.fullmatch(framework_name)
    if match is None:
        return framework_name, None
    return f"{match[1]}experts.{match[3]}", int(match[2])


KeySources = Dict[str, List[Tuple[Optional[int], TensorMap]]]


def maps_by_key(cfg: ModelConfig, entries: CheckpointEntries) -> KeySources:
    """Checkpoint key -> the TensorMaps that make it, with their expert index (None for an
    unstacked key), in HF file order. Raises CheckpointError if they do not cover the model's
    checkpoint keys exactly (the layout tables and the model disagree)."""
    sources: KeySources = {}
    for tensor_map in model_maps(cfg):
        key, expert = checkpoint_key(tensor_map.framework)
        sources.setdefault(key, []).append((expert, tensor_map))
    if sources.keys() != entries.tensors.keys():
        only_maps = sorted(sources.keys() - entries.tensors.keys())
        only_model = sorted(entries.tensors.keys() - sources.keys())
        raise CheckpointError(
            f"the HF layout and the model's checkpoint keys disagree: only in the layout "
            f"{only_maps[:3]}, only in the model {only_model[:3]}."
        )
    return sources
