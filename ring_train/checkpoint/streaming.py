"""torch_dist checkpoints read and written one whole tensor at a time, in one process.

For offline work on whole checkpoints (the WSM merge): no process group and no model are
needed, and memory holds a few tensors rather than a model. A checkpoint written here is an
ordinary torch_dist checkpoint that megatron-core loads at any layout.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ring_train.checkpoint import collective
from ring_train.checkpoint.atomic_io import publish_dir
from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.integrity import record_files
from ring_train.checkpoint.layout import IN_PROGRESS_SUFFIX
from ring_train.checkpoint.marker import WEIGHTS, CompletionMarker, write_marker

TensorInfo = Tuple[Tuple[int, ...], torch.dtype]  # global shape, dtype


@contextlib.contextmanager
def _in_this_process_only():
    # torch.distributed.checkpoint warns on every call without a process group, although
    # one process is exactly what is asked for here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointReader:
    """Whole tensors and objects of one torch_dist checkpoint directory, by checkpoint key."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        # Parses the checkpoint's metadata once; every read below reuses it.
        self._reader = CachedMetadataFileSystemReader(str(self.directory))
        entries = self._reader.read_metadata().state_dict_metadata
        self.tensors: Dict[str, TensorInfo] = {
            key: (tuple(entry.size), entry.properties.dtype)
            for key, entry in entries.items()
            if isinstance(entry, TensorStorageMetadata)
        }

    def tensor(self, key: str) -> torch.Tensor:
        """The whole global tensor `key`, in its stored dtype."""
        shape, dtype = self.tensors[key]
        out = {key: torch.empty(shape, dtype=dtype)}
        with _in_this_process_only():
            dcp.load(out, storage_reader=self._reader, no_dist=True)
        return out[key]

    def object(self, key: str) -> Any:
        """The non-tensor entry `key` (a megatron-core ShardedObject's payload, as stored)."""
        out = {key: None}
        with _in_this_process_only():
            dcp.load(out, storage_reader=self._reader, no_dist=True)
        return out[key]


class _OnDemandPlanner(DefaultSavePlanner):
    """Plans from placeholders; produces each entry's data only when the writer asks for it,
    so at most two entries are alive at a time (torch's writer keeps the previous one while
    the next is produced)."""

    def __init__(self, produce: Callable[[str], Any]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._produce = produce

    def resolve_data(self, write_item):
        return self.transform_object(write_item, self._produce(write_item.index.fqn))


def write_checkpoint(
    directory: Path,
    tensors: Dict[str, TensorInfo],
    objects: Iterable[str],
    produce: Callable[[str], Any],
) -> None:
    """Write a torch_dist checkpoint into the empty `directory` holding `tensors` (key ->
    global shape, dtype) and `objects` (keys of non-tensor entries). `produce(key)` returns an
    entry's value and is called once per entry, while it is written."""
    placeholders: Dict[str, Any] = {
        key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in tensors.items()
    }
    placeholders.update({key: None for key in objects})
    with _in_this_process_only():
        dcp.save(
            placeholders,
            # One file per entry and one writer thread: the writer keeps every tensor of a file
            # alive until the file is closed, so with one file per entry it holds one at a time.
            storage_writer=dcp.FileSystemWriter(
                str(directory), single_file_per_rank=False, thread_count=1
            ),
            planner=_OnDemandPlanner(produce),
            no_dist=True,
        )
    # What megatron-core's loader reads besides the tensors: the format of the files, and the
    # common (non-sharded) state, empty for model weights.
    torch.save({}, Path(directory) / COMMON_STATE_FNAME)
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(directory))


def refuse_existing(output: Path) -> None:
    if Path(output).exists():
        raise CheckpointError(f"{output} already exists; remove it or choose another output.")


def write_weights_checkpoint(
    output: Path,
    step: int,
    tensors: Dict[str, TensorInfo],
    objects: List[str],
    produce: Callable[[str], Any],
    details: Dict[str, Any],
    checksums: bool = True,
) -> Path:
    """`write_checkpoint` as a complete weights-only checkpoint at `output` (which must not
    exist): written under `<output>.tmp`, marked complete, then renamed into place. In this
    process alone."""
    output = Path(output)
    refuse_existing(output)
    staging = output.with_name(output.name + IN_PROGRESS_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_checkpoint(staging, tensors, objects, produce)
    with collective.alone():
        files = record_files(staging, checksums)
    marker = CompletionMarker(
        kind=WEIGHTS,
        step=step,
        files=files,
        model_keys=sorted(tensors),
        model_objects=sorted(objects),
        details=details,
    )
    write_marker(staging, marker)
    publish_dir(staging, output)
    return output
