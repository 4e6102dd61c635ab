"""Writing one checkpoint so that a crash at any moment leaves the previous one in charge.

Order of a save of step S into save_dir (every rank takes part; rank 0 alone touches names):
  1. rank 0 empties iter_S.tmp/ (a leftover of a crashed save of S) and creates it;
  2. all ranks write their shards with megatron-core dist_checkpointing (torch_dist format);
  3. all ranks record the files' sizes and SHA-256s, each hashing a share;
  4. rank 0 writes complete.json into iter_S.tmp/, renames it to iter_S/, then replaces
     `latest` with "iter_S" (write aside, fsync, rename), then removes old checkpoints;
  5. every rank learns whether step 4 succeeded and raises if not.
A crash before step 4 leaves iter_S.tmp/ without a marker and `latest` on the previous step.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from megatron.core import dist_checkpointing

from ring_train.checkpoint import collective
from ring_train.checkpoint.atomic_io import publish_dir, write_atomically
from ring_train.checkpoint.integrity import record_files
from ring_train.checkpoint.layout import (
    IN_PROGRESS_SUFFIX,
    TRACKER_FILE,
    checkpoint_path,
    complete_checkpoints,
    in_progress_path,
)
from ring_train.checkpoint.marker import CompletionMarker, write_marker
from ring_train.checkpoint.sharded_state import current_layout, object_keys, tensor_shapes

logger = logging.getLogger(__name__)


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def prune(save_dir: Path, keep_last: Optional[int]) -> None:
    """Remove crashed saves (`*.tmp`) and, with `keep_last`, all but the newest `keep_last`
    complete checkpoints; the one `latest` names always stays."""
    save_dir = Path(save_dir)
    for leftover in save_dir.glob("iter_*" + IN_PROGRESS_SUFFIX):
        shutil.rmtree(leftover)
    if keep_last is None:
        return
    tracked = (save_dir / TRACKER_FILE).read_text().strip()
    for old in complete_checkpoints(save_dir)[:-keep_last]:
        if old.name != tracked:
            shutil.rmtree(old)


def _over_all_ranks(keys: Iterable[str]) -> List[str]:
    return sorted(set().union(*map(set, collective.all_gather(sorted(keys)))))


def _finish(save_dir: Path, staging: Path, final: Path, marker: CompletionMarker, keep_last) -> None:
    write_marker(staging, marker)
    publish_dir(staging, final)
    write_atomically(save_dir / TRACKER_FILE, final.name + "\n")
    prune(save_dir, keep_last)


def save_and_publish(
    save_dir: Path,
    step: int,
    kind: str,
    sharded_state: dict,
    model_state: dict,
    keep_last: Optional[int],
    checksums: bool,
) -> Path:
    """Collective: write `sharded_state` (a megatron-core sharded state dict that includes
    `model_state`, the model's part) as checkpoint `step` of `save_dir` and make it the latest;
    returns its directory."""
    save_dir = Path(save_dir)
    staging, final = in_progress_path(save_dir, step), checkpoint_path(save_dir, step)
    # Before the save: it turns the factories of `model_state` into the tensors they build.
    model_keys = _over_all_ranks(tensor_shapes(model_state))
    model_objects = _over_all_ranks(object_keys(model_state))
    collective.on_rank0(lambda: _fresh_dir(staging))
    dist_checkpointing.save(sharded_state, str(staging))
    marker = CompletionMarker(
        kind=kind,
        step=step,
        files=record_files(staging, checksums),
        model_keys=model_keys,
        model_objects=model_objects,
        details={"layout": current_layout()},
    )
    collective.on_rank0(lambda: _finish(save_dir, staging, final, marker, keep_last))
    if collective.rank() == 0:
        logger.info("saved %s checkpoint %s", kind, final)
    return final
