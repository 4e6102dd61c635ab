"""Text and jsonl -> megatron-core indexed datasets: contents, EODs, counts, errors, atomicity."""

import importlib.util
import json
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ring_train.data.preprocess import read_documents, write_dataset
from ring_train.data.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
EOD = ByteTokenizer.eod


def _cli():
    path = REPO / "tools" / "preprocess_data.py"
    spec = importlib.util.spec_from_file_location("preprocess_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _byte_ids(text):
    return list(text.encode("utf-8")) + [EOD]


def test_jsonl_becomes_an_indexed_dataset_with_eod_after_each_document(tmp_path, capsys):
    records = [{"text": "first doc", "id": 1}, {"text": ""}, {"text": "zweites Dokument ü"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    prefix = tmp_path / "out" / "web"

    assert _cli().main(["--input", str(source), "--output-prefix", str(prefix)]) == 0

    assert _documents(str(prefix)) == [_byte_ids("first doc"), _byte_ids("zweites Dokument ü")]
    tokens = len(_byte_ids("first doc")) + len(_byte_ids("zweites Dokument ü"))
    assert f"2 documents, {tokens} tokens (EOD included), 1 empty" in capsys.readouterr().out
    # Byte ids fit uint16, as megatron-core's readers expect for a small vocab.
    assert IndexedDataset(str(prefix)).index.dtype == numpy.uint16


def test_text_files_are_one_document_each_or_one_per_line(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("line one\nline two\n")
    b.write_text("only line")

    inputs = [str(a), str(b)]
    whole = write_dataset(str(tmp_path / "whole"), read_documents(inputs), ByteTokenizer())
    lines = write_dataset(
        str(tmp_path / "lines"), read_documents(inputs, lines_as_documents=True), ByteTokenizer()
    )

    per_file = [_byte_ids("line one\nline two\n"), _byte_ids("only line")]
    per_line = [_byte_ids(t) for t in ("line one", "line two", "only line")]
    assert _documents(str(tmp_path / "whole")) == per_file
    assert _documents(str(tmp_path / "lines")) == per_line
    assert (whole.documents, lines.documents) == (2, 3)
    assert lines.tokens == sum(len(ids) for ids in per_line)


def test_missing_input_file_is_named_and_nothing_is_written(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    prefix = tmp_path / "out"
    assert _cli().main(["--input", str(missing), "--output-prefix", str(prefix)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_jsonl_record_without_the_key_names_file_line_and_key(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    expected = rf"{source}:2: no string under key 'text' \(found \['body'\]\)"
    with pytest.raises(ValueError, match=expected):
        write_dataset(str(tmp_path / "out"), read_documents([str(source)]), ByteTokenizer())


def test_a_failure_mid_write_keeps_the_old_dataset_and_leaves_no_temporary_files(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix, ["old one", "old two"], ByteTokenizer())

    def documents_then_crash():
        yield "new document"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(prefix, documents_then_crash(), ByteTokenizer())

    assert _documents(prefix) == [_byte_ids("old one"), _byte_ids("old two")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_no_documents_is_an_error_not_an_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="no non-empty documents"):
        write_dataset(str(tmp_path / "ds"), ["", ""], ByteTokenizer())
    assert list(tmp_path.iterdir()) == []
