"""The built-in corpus: built offline from the standard library, deterministic, rebuilt only
when its sources change."""

import json
import os

from megatron.core.datasets.indexed_dataset import IndexedDataset

from ring_train.data import default_corpus
from ring_train.data.default_corpus import ensure_default_corpus, stdlib_sources
from ring_train.data.tokenizers import ByteTokenizer


def test_built_from_the_stdlib_one_byte_document_per_file(tmp_path):
    prefix = ensure_default_corpus(tmp_path)
    dataset = IndexedDataset(prefix)
    sources = stdlib_sources()
    assert len(dataset) == len(sources) > 100
    first = sources[0].read_bytes()
    assert dataset[0].tolist() == list(first) + [ByteTokenizer.eod]
    assert int(dataset.sequence_lengths.sum()) > 1_000_000


def test_two_builds_are_byte_identical(tmp_path):
    first = ensure_default_corpus(tmp_path / "a")
    second = ensure_default_corpus(tmp_path / "b")
    for suffix in (".bin", ".idx"):
        with open(first + suffix, "rb") as a, open(second + suffix, "rb") as b:
            assert a.read() == b.read()


def test_reused_while_sources_are_unchanged_and_rebuilt_when_they_change(tmp_path, monkeypatch):
    sources = tmp_path / "stdlib"
    sources.mkdir()
    for name, text in [("abc.py", "x = 1\n"), ("zzz.py", "y = 2\n")]:
        (sources / name).write_text(text)
    monkeypatch.setattr(default_corpus.sysconfig, "get_paths", lambda: {"stdlib": str(sources)})
    prefix = ensure_default_corpus(tmp_path / "cache")
    built_at = os.stat(prefix + ".bin").st_mtime_ns

    assert ensure_default_corpus(tmp_path / "cache") == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == built_at

    (sources / "zzz.py").write_text("y = 2000\n")
    ensure_default_corpus(tmp_path / "cache")
    rebuilt = IndexedDataset(prefix)  # keeps its mmap open while its documents are read
    assert rebuilt[1].tolist() == list(b"y = 2000\n") + [ByteTokenizer.eod]
    fingerprint = json.loads(open(prefix + ".json").read())
    assert fingerprint["files"] == [["abc.py", 6], ["zzz.py", 9]]
