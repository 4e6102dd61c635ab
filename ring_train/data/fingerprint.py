"""What a data position means: a fingerprint of everything that decides which samples come in
which order, so that a saved position is never applied to different data.

Datasets are identified by content, not by path or mtime: copying data to another disk keeps
a run resumable, while rewriting a file under the same name does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List

from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

# Files up to this size are hashed whole; larger ones by their size and SAMPLE_BLOCKS evenly
# spaced blocks (first and last included), which bounds start-up reads to 1 MiB per file.
WHOLE_FILE_LIMIT = 8 << 20
SAMPLE_BLOCKS = 16
BLOCK_BYTES = 64 << 10


def file_digest(path: str) -> str:
    """SHA-256 over the file's size and content (sampled blocks above WHOLE_FILE_LIMIT)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as stream:
        if size <= WHOLE_FILE_LIMIT:
            digest.update(stream.read())
        else:
            last = size - BLOCK_BYTES
            for block in range(SAMPLE_BLOCKS):
                stream.seek(last * block // (SAMPLE_BLOCKS - 1))
                digest.update(stream.read(BLOCK_BYTES))
    return digest.hexdigest()


def dataset_digest(path_prefix: str) -> str:
    """Content digest of an indexed dataset's `.bin` and `.idx`."""
    parts = [file_digest(get_bin_path(path_prefix)), file_digest(get_idx_path(path_prefix))]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def digest_of(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def differing_parts(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """`key: saved -> current` for every part that differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
