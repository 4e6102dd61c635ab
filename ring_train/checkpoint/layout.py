"""Where checkpoints live and which one is the latest.

A save directory holds one directory per saved step and a tracker file:

    <save_dir>/
      latest                  text: the name of the newest complete checkpoint, e.g. "iter_0000040"
      iter_0000020/           complete: megatron-core torch_dist files + complete.json
      iter_0000040/
      iter_0000060.tmp/       a save in progress, or one that crashed: never loaded
      wsm/<stage>/iter_*/     weights-only WSM candidates of a stage, same scheme
      wsm/<stage>/merged/     the stage's merged (annealed) weights

A checkpoint directory is complete once it carries `complete.json`; that marker is written
last, after every rank has finished writing, and the directory is renamed from its `.tmp` name
only after that. `latest` is replaced atomically after the rename, so it only ever names a
complete checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from ring_train.checkpoint.errors import CheckpointError

TRACKER_FILE = "latest"
MARKER_FILE = "complete.json"
IN_PROGRESS_SUFFIX = ".tmp"
WSM_DIR = "wsm"
MERGED_NAME = "merged"
_CHECKPOINT_NAME = re.compile(r"iter_(\d{7,})")


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def checkpoint_path(save_dir: Path, step: int) -> Path:
    return Path(save_dir) / checkpoint_name(step)


def in_progress_path(save_dir: Path, step: int) -> Path:
    return Path(save_dir) / (checkpoint_name(step) + IN_PROGRESS_SUFFIX)


def step_of(path: Path) -> Optional[int]:
    """The step in a complete checkpoint's directory name; None for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def wsm_candidates_dir(save_dir: Path, stage: str) -> Path:
    """Save directory of the stage's weights-only merge candidates."""
    return Path(save_dir) / WSM_DIR / stage


def wsm_merged_path(save_dir: Path, stage: str) -> Path:
    return wsm_candidates_dir(save_dir, stage) / MERGED_NAME


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def complete_checkpoints(save_dir: Path) -> List[Path]:
    """The complete checkpoints of `save_dir`, oldest step first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def find_latest(save_dir: Path) -> Optional[Path]:
    """The checkpoint `<save_dir>/latest` names; None when nothing was saved there yet.

    Incomplete saves are never returned: the tracker only ever names a complete checkpoint.
    Raises CheckpointError, naming the tracker file, when it is unreadable, names no
    checkpoint or an incomplete one, or is missing while complete checkpoints exist (someone
    removed it; guessing a checkpoint could resume from the wrong one).
    """
    save_dir = Path(save_dir)
    tracker = save_dir / TRACKER_FILE
    if not tracker.is_file():
        existing = complete_checkpoints(save_dir)
        if existing:
            raise CheckpointError(
                f"{save_dir} holds complete checkpoints ({existing[-1].name} the newest) but no "
                f"'{TRACKER_FILE}' tracker file; write the name of the checkpoint to resume "
                f"into {tracker}, or load that checkpoint by its path."
            )
        return None
    try:
        content = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the tracker file {tracker}: {exc}") from exc
    if not _CHECKPOINT_NAME.fullmatch(content):
        raise CheckpointError(
            f"the tracker file {tracker} holds {content[:80]!r}, not a checkpoint name like "
            f"{checkpoint_name(0)!r}; fix it or load a checkpoint by its path."
        )
    named = save_dir / content
    if not is_complete(named):
        state = "is incomplete (no completion marker)" if named.exists() else "does not exist"
        raise CheckpointError(f"the tracker file {tracker} names {named}, which {state}.")
    return named


def resolve_checkpoint(path: Path) -> Path:
    """The complete checkpoint directory `path` designates: itself, or the checkpoint its
    `latest` tracker names. Raises CheckpointError, naming `path`, for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist.")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file, not a checkpoint directory.")
    if is_complete(path):
        return path
    if (path / TRACKER_FILE).exists() or complete_checkpoints(path):
        return find_latest(path)
    if path.name.endswith(IN_PROGRESS_SUFFIX) or any(path.iterdir()):
        raise CheckpointError(
            f"{path} is not a complete checkpoint: it has no {MARKER_FILE} (a save that did not "
            "finish, or not a checkpoint at all)."
        )
    raise CheckpointError(f"checkpoint directory {path} is empty.")
