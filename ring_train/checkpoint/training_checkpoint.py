"""Save and load training checkpoints (model, optimizer, trainer state, RNG) and weights-only
checkpoints, at any TP/PP/EP/DP layout: megatron-core reshards on load.

Every function here is a collective: call it on all ranks of the job, with the model as a list
of chunks (one per virtual pipeline stage; DDP-wrapped or not) and the megatron-core optimizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import dist_checkpointing

from ring_train.checkpoint import collective
from ring_train.checkpoint.compatibility import check_compatible
from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.integrity import verify_files
from ring_train.checkpoint.layout import find_latest, resolve_checkpoint
from ring_train.checkpoint.marker import TRAINING, WEIGHTS, CompletionMarker, read_marker
from ring_train.checkpoint.publish import save_and_publish
from ring_train.checkpoint.rng import capture_rng_state, restore_rng_state
from ring_train.checkpoint.sharded_state import (
    current_layout,
    model_sharded_state,
    optimizer_sharded_state,
    rng_sharded_object,
    tensor_shapes,
    unwrap,
)
from ring_train.checkpoint.trainer_state import TrainerState
from ring_train.config.checkpoint import LATEST, CheckpointConfig

logger = logging.getLogger(__name__)

Model = Sequence[torch.nn.Module]


def save_checkpoint(
    save_dir: Path,
    model: Model,
    optimizer,
    state: TrainerState,
    keep_last: Optional[int] = None,
    checksums: bool = True,
) -> Path:
    """Write checkpoint `state.step` of `save_dir` (model, optimizer, `state`, every rank's RNG
    states) and make it the one `latest` names; keep the newest `keep_last` (None: all).
    Returns the checkpoint directory."""
    state.check_loadable()
    model_state = model_sharded_state(model)
    sharded = {
        **model_state,
        "optimizer": optimizer_sharded_state(optimizer, model_state, is_loading=False),
        "trainer": state.to_dict(),
        "rng": rng_sharded_object(capture_rng_state()),
    }
    return save_and_publish(save_dir, state.step, TRAINING, sharded, model_state, keep_last, checksums)


def save_weights(
    save_dir: Path, step: int, model: Model, keep_last: Optional[int] = None, checksums: bool = True
) -> Path:
    """Write the model tensors alone as checkpoint `step` of `save_dir` (a WSM candidate)."""
    model_state = model_sharded_state(model)
    return save_and_publish(save_dir, step, WEIGHTS, model_state, model_state, keep_last, checksums)


def _checked(path: Path, checksums: bool) -> tuple[Path, CompletionMarker]:
    checkpoint = resolve_checkpoint(path)
    marker = read_marker(checkpoint)
    verify_files(checkpoint, marker.files, checksums)
    return checkpoint, marker


def _load_model(model: Model, loaded: dict) -> None:
    for index, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded[f"model{index}"], strict=True)


def load_checkpoint(path: Path, model: Model, optimizer, checksums: bool = True) -> TrainerState:
    """Load a training checkpoint into `model` and `optimizer` and return its trainer state.

    `path` is a checkpoint directory or a save directory (its `latest` is loaded). Files are
    checked against the completion marker and tensor keys and shapes against the model before
    anything is read into it. RNG states are restored when the layout is the one saved (they
    are per rank); otherwise every rank keeps its freshly seeded generators, which is logged.
    """
    checkpoint, marker = _checked(path, checksums)
    if marker.kind != TRAINING:
        raise CheckpointError(
            f"{checkpoint} holds {marker.kind} only, no optimizer or trainer state; load it with "
            "load_weights."
        )
    model_state = model_sharded_state(model)
    template = {
        **model_state,
        "optimizer": optimizer_sharded_state(optimizer, model_state, is_loading=True),
    }
    same_layout = marker.details.get("layout") == current_layout()
    if same_layout:
        template["rng"] = rng_sharded_object(None)
    elif collective.rank() == 0:
        logger.warning(
            "%s was saved under layout %s, this job runs %s: RNG states are not restored, every "
            "rank keeps its seeded generators.",
            checkpoint, marker.details.get("layout"), current_layout(),
        )
    check_compatible(
        checkpoint, tensor_shapes(template), tensor_shapes(model_state), marker.model_keys
    )
    loaded = dist_checkpointing.load(template, str(checkpoint))
    _load_model(model, loaded)
    optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        restore_rng_state(loaded["rng"])
    if collective.rank() == 0:
        logger.info("resumed from %s (step %d)", checkpoint, marker.step)
    return TrainerState.from_dict(loaded["trainer"])


def load_weights(path: Path, model: Model, checksums: bool = True) -> CompletionMarker:
    """Load the model tensors of any checkpoint (weights-only or training) into `model`; returns
    the checkpoint's marker. Load before building the optimizer: the optimizer's fp32 main
    weights are copies taken when it is built."""
    checkpoint, marker = _checked(path, checksums)
    model_state = model_sharded_state(model)
    shapes = tensor_shapes(model_state)
    check_compatible(checkpoint, shapes, shapes, marker.model_keys)
    _load_model(model, dist_checkpointing.load(model_state, str(checkpoint)))
    return marker


def checkpoint_to_resume(config: CheckpointConfig) -> Optional[Path]:
    """The checkpoint `config.load` asks for, or None to start from initialization (only with
    load=None, or load="latest" on an empty save_dir and exit_on_missing_checkpoint=False,
    which is logged)."""
    if config.load is None:
        return None
    if config.load != LATEST:
        return resolve_checkpoint(Path(config.load))
    found = find_latest(Path(config.save_dir))
    if found is None:
        if config.exit_on_missing_checkpoint:
            raise CheckpointError(
                f"no checkpoint to resume in {config.save_dir} (checkpoint.load=latest, "
                "checkpoint.exit_on_missing_checkpoint=true)."
            )
        if collective.rank() == 0:
            logger.warning(
                "no checkpoint in %s yet: starting from initialization", config.save_dir
            )
    return found
