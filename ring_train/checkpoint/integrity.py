"""File sizes and SHA-256 digests of a checkpoint, recorded on save and checked on load.

Hashing is the one part of a save or load that reads every byte, so the files are dealt out
over the ranks; each rank hashes its share and the results are exchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

from ring_train.checkpoint import collective
from ring_train.checkpoint.layout import MARKER_FILE
from ring_train.checkpoint.marker import FileRecord

_READ_BLOCK = 8 << 20  # bytes hashed per read


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(directory: Path) -> List[str]:
    """Paths of the checkpoint's files relative to `directory`, sorted; the marker excluded."""
    directory = Path(directory)
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name != MARKER_FILE
    )


def record_files(directory: Path, checksums: bool) -> Dict[str, FileRecord]:
    """Collective: size (and SHA-256 if `checksums`) of every file of `directory`, on every
    rank. Rank 0 lists the files; each rank reads its share of them."""
    directory = Path(directory)
    names = collective.on_rank0(lambda: checkpoint_files(directory))
    mine = {
        name: FileRecord(
            bytes=(directory / name).stat().st_size,
            sha256=sha256_of(directory / name) if checksums else None,
        )
        for name in collective.my_share(names)
    }
    records: Dict[str, FileRecord] = {}
    for share in collective.all_gather(mine):
        records.update(share)
    return dict(sorted(records.items()))


def _problem(path: Path, record: FileRecord, checksums: bool) -> Optional[str]:
    if not path.is_file():
        return f"checkpoint file {path} is missing."
    size = path.stat().st_size
    if size != record.bytes:
        return (
            f"checkpoint file {path} has {size} bytes, the completion marker records "
            f"{record.bytes} (truncated or overwritten)."
        )
    if checksums and record.sha256 is not None:
        actual = sha256_of(path)
        if actual != record.sha256:
            return (
                f"checkpoint file {path} is corrupted: SHA-256 {actual}, the completion marker "
                f"records {record.sha256}."
            )
    return None


def verify_files(directory: Path, records: Dict[str, FileRecord], checksums: bool) -> None:
    """Collective: raise CheckpointError on every rank, naming the file, if a recorded file is
    missing, has another size, or (with `checksums`, where recorded) another SHA-256. Each
    rank checks its share of the files."""
    directory = Path(directory)
    error: Optional[str] = None
    for name in collective.my_share(sorted(records)):
        error = _problem(directory / name, records[name], checksums)
        if error is not None:
            break
    collective.raise_first_error(error)
