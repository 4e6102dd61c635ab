"""Training data: which tokenized datasets, mixed how, and how samples become micro-batches."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ring_train.config.errors import ConfigError

# A blend path naming the built-in corpus (the standard library's own sources, byte-tokenized
# into the cache on first use), so that a fresh machine trains without any download.
DEFAULT_CORPUS = "default"
BYTE_TOKENIZER = "byte"
BLEND_KEYS = ("path", "weight")


def _default_blend() -> List[Dict[str, Any]]:
    return [{"path": DEFAULT_CORPUS, "weight": 1.0}]


@dataclass
class DataConfig:
    # Weighted mixture of tokenized datasets, each {path: prefix of <path>.bin/.idx as written by
    # tools/preprocess_data.py, weight: > 0}. Weights are relative; megatron-core draws samples
    # in these proportions. The path "default" is the built-in corpus.
    blend: List[Dict[str, Any]] = field(default_factory=_default_blend)
    # "byte" (256 byte ids + EOD = 257 ids) or the path of a HF `tokenizer.json`; it must be
    # the tokenizer the datasets were preprocessed with.
    tokenizer: str = BYTE_TOKENIZER
    # End-of-document token of a HF tokenizer; None takes `eos_token` from the
    # tokenizer_config.json beside tokenizer.json. The byte tokenizer has its own EOD id (256).
    eod_token: Optional[str] = None
    # Pack each micro-batch into one row with cu_seqlens at every sample start and after every
    # EOD, so that attention and the lightning state never cross a document. Off: [b, s] rows
    # that run across documents, as in plain GPT training.
    reset_state_at_eod: bool = True
    # No loss where the input token is EOD: its target is the first token of an unrelated
    # document (megatron-core's eod_mask_loss).
    eod_mask_loss: bool = False
    # Share of every dataset's documents held out for the validation loss (0: no validation).
    validation_fraction: float = 0.01
    # Seeds megatron-core's document and sample shuffles.
    seed: int = 1234
    # DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = 2
    # Built-in corpus and megatron-core's index caches; None: $XDG_CACHE_HOME/ring-train or
    # ~/.cache/ring-train. With several nodes it must be a directory every node shares.
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def cache_path(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ring-train"

    @property
    def uses_default_corpus(self) -> bool:
        return any(entry["path"] == DEFAULT_CORPUS for entry in self.blend)

    def validate(self) -> None:
        if not self.blend:
            raise ConfigError(
                f"data.blend is empty: give at least one {{path, weight}} entry, or "
                f"[{{path: {DEFAULT_CORPUS}, weight: 1.0}}] for the built-in corpus."
            )
        for index, entry in enumerate(self.blend):
            _check_blend_entry(index, entry)
        if self.tokenizer != BYTE_TOKENIZER and not Path(self.tokenizer).is_file():
            raise ConfigError(
                f"data.tokenizer={self.tokenizer!r}: no such file; give the path of a HF "
                f"tokenizer.json or {BYTE_TOKENIZER!r}."
            )
        if self.tokenizer == BYTE_TOKENIZER and self.eod_token is not None:
            raise ConfigError(
                f"data.eod_token={self.eod_token!r} is only for HF tokenizers; the byte "
                f"tokenizer's EOD is id 256. Remove data.eod_token."
            )
        if self.uses_default_corpus and self.tokenizer != BYTE_TOKENIZER:
            raise ConfigError(
                f"data.blend uses the built-in corpus, which is byte-tokenized, but "
                f"data.tokenizer={self.tokenizer!r}; set data.tokenizer={BYTE_TOKENIZER} or "
                f"blend only datasets preprocessed with that tokenizer."
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"data.validation_fraction={self.validation_fraction} must be in [0, 1)."
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0.")


def _check_blend_entry(index: int, entry: Dict[str, Any]) -> None:
    name = f"data.blend[{index}]"
    if not isinstance(entry, dict) or set(entry) != set(BLEND_KEYS):
        raise ConfigError(
            f"{name}={entry!r}: each blend entry is {{path: <prefix of .bin/.idx>, weight: "
            f"<number > 0>}} with exactly these keys."
        )
    weight = entry["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{name}.weight={weight!r} must be a number > 0.")
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(
            f"{name}.weight={weight} must be a finite number > 0; drop the entry to leave a "
            f"dataset out."
        )
    path = entry["path"]
    if path == DEFAULT_CORPUS:
        return
    missing = [f"{path}{end}" for end in (".bin", ".idx") if not Path(f"{path}{end}").is_file()]
    if missing:
        raise ConfigError(
            f"{name}.path={path!r}: no indexed dataset there, missing {' and '.join(missing)}. "
            f"Fix the path (a prefix, without .bin/.idx) or create the dataset with "
            f"`python tools/preprocess_data.py --input <files> --output-prefix {path}`."
        )
