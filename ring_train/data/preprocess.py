"""Text to megatron-core indexed datasets (`<prefix>.bin` token ids, `<prefix>.idx` document
index), one EOD appended after every document.

A dataset is complete exactly when its `.idx` exists: both files are written under temporary
names and renamed into place `.bin` first, `.idx` last, after any old `.idx` was removed, so a
crash at any point leaves either the old dataset, the new one, or none, never a mix.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from ring_train.data.tokenizers import Tokenizer


@dataclass
class PreprocessStats:
    documents: int
    tokens: int  # EODs included
    skipped_empty: int  # documents with no text, which are left out


def read_documents(
    paths: Sequence[str], json_key: str = "text", lines_as_documents: bool = False
) -> Iterator[str]:
    """Documents of `paths` in order: a `.jsonl` file gives one per line (its `json_key`
    string); any other file is plain UTF-8 text, one document per file, or per line with
    `lines_as_documents`."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input files not found: {', '.join(missing)}")
    for path in paths:
        if path.endswith(".jsonl"):
            yield from _jsonl_documents(path, json_key)
        elif lines_as_documents:
            with open(path, encoding="utf-8") as lines:
                yield from (line.rstrip("\n") for line in lines)
        else:
            yield Path(path).read_text(encoding="utf-8")


def _jsonl_documents(path: str, json_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error}).") from None
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{number}: no string under key {json_key!r} (found {found}); "
                    f"choose the key with --json-key."
                )
            yield text


def write_dataset(
    output_prefix: str, documents: Iterable[str], tokenizer: Tokenizer
) -> PreprocessStats:
    """Tokenizes `documents`, appends `tokenizer.eod` to each and writes
    `<output_prefix>.bin/.idx` atomically. Empty documents are skipped."""
    skipped = 0

    def token_documents() -> Iterator[List[int]]:
        nonlocal skipped
        for text in documents:
            if not text:
                skipped += 1
                continue
            yield tokenizer.encode(text) + [tokenizer.eod]

    count, tokens = write_token_documents(output_prefix, token_documents(), tokenizer.vocab_size)
    return PreprocessStats(documents=count, tokens=tokens, skipped_empty=skipped)


def write_token_documents(
    output_prefix: str, documents: Iterable[Sequence[int]], vocab_size: int
) -> Tuple[int, int]:
    """Writes each token sequence as one document of `<output_prefix>.bin/.idx`, atomically
    (see the module docstring); returns (documents, tokens). Ids are stored as uint16 when the
    vocab fits, else int32."""
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    Path(bin_path).parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bin_tmp, idx_tmp = bin_path + suffix, idx_path + suffix
    count = tokens = 0
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=DType.optimal_dtype(vocab_size))
        for ids in documents:
            builder.add_item(torch.from_numpy(numpy.asarray(ids, dtype=numpy.int64)))
            builder.end_document()
            count, tokens = count + 1, tokens + len(ids)
        builder.finalize(idx_tmp)
        if count == 0:
            raise ValueError(f"no non-empty documents for {output_prefix}: nothing to train on.")
        for path in (bin_tmp, idx_tmp):
            _fsync(path)
        Path(idx_path).unlink(missing_ok=True)
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
        _fsync(str(Path(idx_path).parent))
    finally:
        for path in (bin_tmp, idx_tmp):
            Path(path).unlink(missing_ok=True)
    return count, tokens


def _fsync(path: str) -> None:
    """Flushes a file, or a directory's entries, to disk before it is relied on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
