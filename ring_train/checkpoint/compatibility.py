"""Does a checkpoint fit the model it is about to be loaded into?

Checked against the checkpoint's metadata before a single tensor is read, so a mismatch leaves
the model as it was. megatron-core's own load would either stop at the first missing key with
the list of every key, or (for keys the model lacks) say nothing at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Set, Tuple

import torch
from megatron.core import dist_checkpointing

from ring_train.checkpoint import collective

Shapes = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]


def _first_mismatch(
    checkpoint: Path, expected: Shapes, stored: Dict[str, Tuple[int, ...]], model_keys: Set[str]
) -> Optional[str]:
    for key, (shape, _) in expected.items():
        owner = "the model" if key in model_keys else "the optimizer"
        if key not in stored:
            hint = "" if key in model_keys else (
                "; optimizer state does not carry over to another optimizer or expert-parallel "
                "size, load_weights loads the model alone"
            )
            return (
                f"missing key in checkpoint {checkpoint}: {key} ({owner} expects shape {shape}, "
                f"the checkpoint has no such tensor{hint})"
            )
        if stored[key] != shape:
            return (
                f"shape mismatch for {key}: checkpoint {checkpoint} has {stored[key]}, {owner} "
                f"expects {shape}"
            )
    return None


def check_compatible(
    checkpoint: Path, expected: Shapes, model_keys: Iterable[str], checkpoint_model_keys: Iterable[str]
) -> None:
    """Collective: raise CheckpointError on every rank if the checkpoint lacks a tensor this rank
    would load (`expected`: key -> global shape and dtype, model and optimizer), stores one with
    another global shape, or holds model weights (`checkpoint_model_keys`) that no rank's model
    has (`model_keys`: this rank's model tensor keys). The message names the first such key and
    both shapes."""
    stored = {
        key: tuple(tensor.global_shape)
        for key, tensor in dist_checkpointing.load_tensors_metadata(str(checkpoint)).items()
    }
    model_keys = set(model_keys)
    error = _first_mismatch(checkpoint, expected, stored, model_keys)
    model_everywhere = set().union(*map(set, collective.all_gather(sorted(model_keys))))
    unexpected = sorted(set(checkpoint_model_keys) - model_everywhere)
    if error is None and unexpected:
        error = (
            f"unexpected key in checkpoint {checkpoint}: {unexpected[0]} (shape "
            f"{stored.get(unexpected[0])} in the checkpoint, the model has no such tensor; "
            f"{len(unexpected)} such keys)"
        )
    collective.raise_first_error(error)
