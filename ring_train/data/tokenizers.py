"""Tokenizers: the built-in byte tokenizer and HF `tokenizers` ones, behind one small interface.

Both carry `unique_identifiers`, the attribute megatron-core's datasets serialise into their
index-cache keys, so indices built for one tokenizer are never reused for another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence

from ring_train.config.data import BYTE_TOKENIZER
from ring_train.config.errors import ConfigError

# Where a user names the EOD token: in a recipe, or when preprocessing.
_SET_EOD = "data.eod_token (tools/preprocess_data.py: --eod-token)"


class Tokenizer(Protocol):
    vocab_size: int  # ids are in [0, vocab_size)
    eod: int  # end-of-document id, appended after every document
    unique_identifiers: Dict[str, str]

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOD = 256: needs no file and covers any text."""

    vocab_size = 257
    eod = 256

    def __init__(self) -> None:
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": str(self.vocab_size)}

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """EOD ids are dropped; byte sequences that are not UTF-8 decode to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= self.eod]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the byte tokenizer's vocab [0, 257).")
        return bytes(i for i in ids if i != self.eod).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF `tokenizers` tokenizer read from its `tokenizer.json`. Special tokens are not added
    on encode: documents get exactly one EOD, appended by preprocessing."""

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        self._tokenizer = RustTokenizer.from_file(str(self.path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eod_token = eod_token if eod_token is not None else _eos_from_tokenizer_config(self.path)
        eod = self._tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ConfigError(
                f"eod_token={eod_token!r} is not a token of {self.path}; set "
                f"{_SET_EOD} to the tokenizer's end-of-text token."
            )
        self.eod = eod
        self.unique_identifiers = {
            "class": type(self).__name__,
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "eod": str(self.eod),
        }

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _eos_from_tokenizer_config(tokenizer_json: Path) -> str:
    """The `eos_token` of the tokenizer_config.json that HF checkpoints keep beside
    tokenizer.json (a string, or a dict with "content")."""
    config_path = tokenizer_json.with_name("tokenizer_config.json")
    eos = None
    if config_path.is_file():
        eos = json.loads(config_path.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        raise ConfigError(
            f"{tokenizer_json}: no end-of-document token known ({config_path} has no "
            f"eos_token); set {_SET_EOD} to the tokenizer's end-of-text token."
        )
    return eos


def load_tokenizer(name_or_path: str, eod_token: Optional[str] = None) -> Tokenizer:
    """`"byte"` or the path of a HF tokenizer.json with its end-of-document token (None: the
    `eos_token` of the tokenizer_config.json beside it)."""
    if name_or_path == BYTE_TOKENIZER:
        if eod_token is not None:
            raise ConfigError(
                f"eod_token={eod_token!r} is for HF tokenizers; the byte tokenizer's EOD is 256."
            )
        return ByteTokenizer()
    if not Path(name_or_path).is_file():
        raise ConfigError(
            f"tokenizer {name_or_path!r}: no such file; give a HF tokenizer.json or "
            f"{BYTE_TOKENIZER!r}."
        )
    return HFTokenizer(name_or_path, eod_token)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises ConfigError when the tokenizer makes ids the model's embedding cannot hold."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
            f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding. "
            f"Set model.vocab_size >= {tokenizer.vocab_size} (padded to a multiple of the "
            f"tensor-parallel size) or use the tokenizer the model was made for."
        )
