"""Byte and HF tokenizers: round trips, EOD ids, and the vocab check against the model."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ring_train.config.errors import ConfigError
from ring_train.data.tokenizers import ByteTokenizer, check_vocab, load_tokenizer

TEXT = "def f(x):\n    return x ** 2  # naïve — 日本語 ✓\n"


def test_byte_tokenizer_round_trips_any_text_with_eod_256_of_257_ids():
    tokenizer = load_tokenizer("byte")
    ids = tokenizer.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert (tokenizer.vocab_size, tokenizer.eod) == (257, 256)
    assert tokenizer.decode(ids + [tokenizer.eod]) == TEXT
    with pytest.raises(ValueError, match="257"):
        tokenizer.decode([300])


def _write_hf_tokenizer(directory, eos="<|endoftext|>"):
    """A small byte-level BPE trained on the spot, with the usual HF files beside it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TEXT * 20, "hello world " * 50], trainer)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return path, tokenizer


def test_hf_tokenizer_round_trips_with_eod_from_tokenizer_config(tmp_path):
    path, reference = _write_hf_tokenizer(tmp_path)
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.eod == reference.token_to_id("<|endoftext|>")
    assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.eod not in ids  # EOD comes from preprocessing only
    assert tokenizer.decode(ids) == TEXT


def test_hf_tokenizer_takes_a_given_eod_token_and_refuses_an_unknown_one(tmp_path):
    path, reference = _write_hf_tokenizer(tmp_path)
    assert load_tokenizer(str(path), eod_token="<pad>").eod == reference.token_to_id("<pad>")
    with pytest.raises(ConfigError, match="eod_token='<eos>'"):
        load_tokenizer(str(path), eod_token="<eos>")


def test_hf_tokenizer_without_a_known_eod_asks_for_eod_token(tmp_path):
    path, _ = _write_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="data.eod_token"):
        load_tokenizer(str(path))


def test_tokenizer_identity_differs_between_tokenizers(tmp_path):
    path, _ = _write_hf_tokenizer(tmp_path)
    hf = load_tokenizer(str(path))
    other_eod = load_tokenizer(str(path), eod_token="<pad>")
    identities = [t.unique_identifiers for t in (ByteTokenizer(), hf, other_eod)]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == 3


def test_missing_tokenizer_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ConfigError, match=str(missing)):
        load_tokenizer(str(missing))


def test_vocab_larger_than_the_model_is_refused_naming_both_sizes():
    check_vocab(ByteTokenizer(), 257)
    with pytest.raises(ConfigError, match=r"257 ids but model.vocab_size=256.*>= 257"):
        check_vocab(ByteTokenizer(), 256)
