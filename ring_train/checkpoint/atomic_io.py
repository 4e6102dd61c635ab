"""Durable file-system updates: a reader sees the old state or the new one, never a mixture,
and a completed update survives a crash of the machine (data and directory entries fsynced)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# A published directory that a newer save of the same step displaces is parked under this
# suffix until the new one is in place.
DISPLACED_SUFFIX = ".displaced"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Replace file `path` by `text` in one step: write a sibling, fsync it, rename over."""
    staging = path.with_name(path.name + ".writing")
    with open(staging, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)
    fsync_dir(path.parent)


def publish_dir(staging: Path, final: Path) -> None:
    """Move the finished directory `staging` to `final` by rename, durably.

    A directory cannot be renamed over a non-empty one, so an existing `final` is first moved
    aside and removed once the new one is in place.
    """
    fsync_dir(staging)
    displaced = None
    if final.exists():
        displaced = final.with_name(final.name + DISPLACED_SUFFIX)
        if displaced.exists():
            shutil.rmtree(displaced)
        os.rename(final, displaced)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if displaced is not None:
        shutil.rmtree(displaced)
