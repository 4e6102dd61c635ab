"""megatron-core GPT datasets for a DataConfig: blend, train/validation split, index caches.

Collective when torch.distributed is initialised: every rank calls `resolve_blend` and
`build_datasets` together. Global rank 0 alone builds the built-in corpus, reads the datasets'
digests and builds megatron-core's index caches; the others read what it wrote, so the cache
directory must be one that every rank sees (checked first). Without a process group (a tool
or test of one process) indices are built in memory.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from ring_train.config.data import DEFAULT_CORPUS, DataConfig
from ring_train.config.errors import ConfigError
from ring_train.data.default_corpus import ensure_default_corpus
from ring_train.data.fingerprint import dataset_digest, digest_of
from ring_train.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Blend:
    prefixes: List[str]  # resolved .bin/.idx prefixes
    weights: List[float]
    digests: List[str]  # content digest of each dataset

    def describe(self) -> List[dict]:
        """Identity of the mixture for fingerprints: contents and weights, not paths."""
        return [{"content": d, "weight": w} for d, w in zip(self.digests, self.weights)]


def from_rank_zero(fn: Callable[[], T]) -> T:
    """`fn()` computed on global rank 0 and sent to every rank. A failure on rank 0 is raised
    on every rank, rather than leaving the others waiting for it."""
    if not dist.is_initialized():
        return fn()
    outcome: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(True, fn())]
        except Exception as error:
            outcome = [(False, f"{type(error).__name__}: {error}")]
            raise
        finally:
            dist.broadcast_object_list(outcome, src=0)
    else:
        dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise RuntimeError(f"rank 0 failed to prepare the data: {value}")
    return value


def resolve_blend(config: DataConfig) -> Blend:
    """Prefixes (the built-in corpus built into the cache if named) and content digests."""
    cache = config.cache_path
    check_cache_shared(cache)

    def on_rank_zero() -> Blend:
        prefixes = [
            ensure_default_corpus(cache) if entry["path"] == DEFAULT_CORPUS else str(entry["path"])
            for entry in config.blend
        ]
        weights = [float(entry["weight"]) for entry in config.blend]
        return Blend(prefixes, weights, [dataset_digest(p) for p in prefixes])

    return from_rank_zero(on_rank_zero)


def split_string(validation_fraction: float) -> str:
    """megatron-core's "train,valid,test" weights (its parser reads plain decimals only)."""
    return f"{1.0 - validation_fraction:.6f},{validation_fraction:.6f},0"


def check_splits(blend: Blend, split: str) -> None:
    """Every dataset needs documents in every non-empty split: megatron-core would otherwise
    loop forever looking for tokens in an empty one."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in blend.prefixes:
        documents = GPTDataset.numel_low_level_dataset(IndexedDataset(prefix))
        for part, bounds in zip(Split, matrix):
            if bounds is None:
                continue
            # The same rounding as BlendedMegatronDatasetBuilder's document split.
            count = int(round(bounds[1] * documents)) - int(round(bounds[0] * documents))
            if count == 0:
                raise ConfigError(
                    f"data.validation_fraction (split {split}) leaves the {part.name} split of "
                    f"{prefix} ({documents} documents) without documents; change "
                    f"data.validation_fraction or use a dataset with more documents."
                )


def check_cache_shared(cache_dir: Path) -> None:
    """Raises on every rank unless all ranks see a file global rank 0 writes to `cache_dir`:
    the built-in corpus and megatron-core's index caches are written by rank 0 only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = cache_dir / f".shared-check-{token[0]}"
    if dist.get_rank() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
    dist.barrier()
    seen: List[Optional[bool]] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, marker.exists())
    if dist.get_rank() == 0:
        marker.unlink()
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(
            f"data.cache_dir={str(cache_dir)!r} is not shared: ranks {blind} do not see what "
            f"rank 0 writes there. Set data.cache_dir to a directory on a filesystem every node "
            f"mounts."
        )


def build_datasets(
    config: DataConfig,
    tokenizer: Tokenizer,
    blend: Blend,
    seq_length: int,
    train_samples: int,
    valid_samples: int,
):
    """(train, validation or None) megatron-core datasets of at least `train_samples` and
    `valid_samples` samples of `seq_length` (+1) tokens; items are dicts of [seq_length]
    tensors tokens, labels, loss_mask, position_ids."""
    split = split_string(config.validation_fraction)
    check_splits(blend, split)
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=seq_length,
        # One dataset without weights: a plain GPTDataset, no single-member blend around it.
        blend=(blend.prefixes, blend.weights if len(blend.prefixes) > 1 else None),
        split=split,
        path_to_cache=_index_cache(config.cache_path, blend),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=config.eod_mask_loss,
        # Documents are separated by cu_seqlens, never by a dense [s, s] mask.
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset,
        [train_samples, valid_samples, 0],
        # Every rank reads its own micro-batches: all pipeline stages walk the same batches.
        lambda: True,
        gpt_config,
    ).build()
    return train, valid


def _index_cache(cache_dir: Path, blend: Blend) -> str:
    """Where megatron-core keeps its index caches, keyed by dataset contents (its own keys
    hold paths only, so a rewritten dataset would reuse stale indices)."""
    if not dist.is_initialized():
        # megatron-core's BlendedDataset asks torch.distributed for the rank on a cache miss,
        # so without a process group nothing is cached. An empty string, unlike None, also
        # keeps GPTDataset from caching beside the data.
        logger.info("no process group: dataset indices are built in memory, not cached")
        return ""
    return str(cache_dir / "indices" / digest_of({"blend": blend.describe()})[:16])
