"""The built-in corpus: every top-level module of this Python's standard library (~5 MB of
source on CPython 3.11, one document per file, sorted by name), byte-tokenized into the cache
on first use. Every Python installation has these files, so `recipe=tiny` trains offline on
a fresh machine.

A JSON fingerprint beside the dataset (file names and sizes, tokenizer) says what it was
built from; a changed standard library rebuilds it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
import uuid
from pathlib import Path
from typing import List

from megatron.core.datasets.indexed_dataset import IndexedDataset

from ring_train.data.preprocess import write_dataset
from ring_train.data.tokenizers import ByteTokenizer

logger = logging.getLogger(__name__)


def stdlib_sources() -> List[Path]:
    """The top-level `*.py` files of the standard library, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def corpus_prefix(cache_dir: Path) -> Path:
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(cache_dir) / "corpus" / f"stdlib-{version}-byte"


def _fingerprint(sources: List[Path]) -> dict:
    return {
        "files": [[p.name, p.stat().st_size] for p in sources],
        "tokenizer": ByteTokenizer().unique_identifiers,
    }


def ensure_default_corpus(cache_dir: Path) -> str:
    """Path prefix of the built-in corpus under `cache_dir`, built first if absent or stale.
    Safe to call from several processes at once: each writes under its own temporary names."""
    prefix = corpus_prefix(cache_dir)
    fingerprint_path = prefix.with_suffix(".json")
    sources = stdlib_sources()
    expected = _fingerprint(sources)
    if (
        fingerprint_path.is_file()
        and json.loads(fingerprint_path.read_text()) == expected
        and IndexedDataset.exists(str(prefix))
    ):
        return str(prefix)
    logger.info("building the built-in corpus from %d stdlib files into %s", len(sources), prefix)
    texts = (p.read_text(encoding="utf-8", errors="replace") for p in sources)
    stats = write_dataset(str(prefix), texts, ByteTokenizer())
    logger.info("built-in corpus: %d documents, %d tokens", stats.documents, stats.tokens)
    tmp = fingerprint_path.with_name(f"{fingerprint_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(expected))
    os.replace(tmp, fingerprint_path)
    return str(prefix)
