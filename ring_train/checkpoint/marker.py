"""The completion marker `complete.json`: written last into a finished checkpoint directory.

It makes the directory complete (see `layout`) and records what a reader must check before
trusting it: every file's size and SHA-256, and the model's keys (which entries of the
checkpoint are the model, as opposed to optimizer and per-rank state).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ring_train.checkpoint.atomic_io import write_atomically
from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.layout import MARKER_FILE

FORMAT = "ring-train/torch_dist/1"
TRAINING = "training"  # model, optimizer, trainer state
WEIGHTS = "weights"  # model tensors only (WSM candidates, merged models)
KINDS = (TRAINING, WEIGHTS)


@dataclass
class FileRecord:
    bytes: int
    sha256: Optional[str]  # None when saved without checksums


@dataclass
class CompletionMarker:
    kind: str
    step: int
    files: Dict[str, FileRecord]  # path relative to the checkpoint directory -> record
    model_keys: List[str]  # tensor keys of the model weights, sorted
    model_objects: List[str]  # keys of the model's non-tensor entries (`_extra_state`), sorted
    # Free-form facts for people and tools: the saving layout, a merge's sources and weights.
    details: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT


def write_marker(directory: Path, marker: CompletionMarker) -> None:
    write_atomically(Path(directory) / MARKER_FILE, json.dumps(asdict(marker), indent=1) + "\n")


def read_marker(directory: Path) -> CompletionMarker:
    """The marker of checkpoint `directory`; CheckpointError naming the file if it is missing
    or not a marker this code wrote."""
    path = Path(directory) / MARKER_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint: {path} is missing.")
    try:
        raw = json.loads(path.read_text())
        marker = CompletionMarker(**raw)
        marker.files = {name: FileRecord(**record) for name, record in marker.files.items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"the completion marker {path} is unreadable: {exc}") from exc
    if marker.format != FORMAT or marker.kind not in KINDS:
        raise CheckpointError(
            f"the completion marker {path} describes format {marker.format!r} / kind "
            f"{marker.kind!r}; this code reads {FORMAT!r} with kind in {KINDS}."
        )
    return marker
