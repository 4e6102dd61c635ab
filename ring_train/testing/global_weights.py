"""Layout-independent weights: every rank fills its parameter shards from global tensors drawn
from a seed derived from the checkpoint key, cut at the shard's own place in its
`sharded_state_dict()`. Any TP/PP/EP/DP layout then holds the same model as one process."""

from __future__ import annotations

import zlib
from typing import Iterable

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from ring_train.checkpoint.sharded_state import model_metadata


RECENT_GLOBAL_TENSORS = 4


def global_tensor(key: str, shape, vector: bool, std: float = 0.05) -> torch.Tensor:
    """The whole tensor behind checkpoint key `key`: norm weights (`vector`) near 1, the
    others N(0, std)."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=generator)
    return 1.0 + 0.1 * noise if vector else std * noise


@torch.no_grad()
def fill_global_weights(chunks: Iterable[torch.nn.Module], std: float = 0.05) -> None:
    """Give every trainable parameter shard of `chunks` its slice of `global_tensor(key)`."""
    # The experts of a layer share their keys (the expert axis is prepended), visited in turn
    # (fc1, fc2 of expert 0, then of expert 1, ...): keep the last few global tensors instead
    # of drawing one per expert.
    recent: dict = {}
    for chunk in chunks:
        sharded = chunk.sharded_state_dict(metadata=model_metadata())
        # Factories (e.g. the SwiGLU fc1 split into gate and up halves) become ShardedTensors
        # that view the parameter.
        apply_factories(sharded)
        for tensor in nested_values(sharded):
            if not isinstance(tensor, ShardedTensor) or not tensor.data.requires_grad:
                continue
            local = (1,) * tensor.prepend_axis_num + tuple(tensor.local_shape)
            index = tuple(slice(o, o + n) for o, n in zip(tensor.global_offset, local))
            # Leading (layer, expert) axes are prepended to the tensor's own shape.
            vector = len(tensor.global_shape) - tensor.prepend_axis_num == 1
            if tensor.key not in recent:
                if len(recent) == RECENT_GLOBAL_TENSORS:
                    recent.pop(next(iter(recent)))
                recent[tensor.key] = global_tensor(tensor.key, tensor.global_shape, vector, std)
            full = recent[tensor.key]
            tensor.data.copy_(full[index].reshape(tensor.local_shape))
