"""Per-step micro-batches of one data-parallel rank, in megatron's order, resumable.

Sample order is megatron-core's (its GPTDataset / BlendedDataset shuffles); batching is
Megatron-LM's pretraining sampler: optimizer step t covers the global samples
[c + t*G, c + (t+1)*G) for G = global_batch_size after c consumed samples, handed out in
rounds of micro_batch_size * dp_size where DP rank r takes the r-th micro_batch_size of each
round. The DP ranks' shares are disjoint and their union is the global batch. A position is one
number, consumed samples, the same on every DP rank: a run may resume with another DP size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

from torch.utils.data import DataLoader

from ring_train.config.data import DataConfig
from ring_train.config.errors import ConfigError
from ring_train.data.datasets import build_datasets, resolve_blend
from ring_train.data.fingerprint import differing_parts, digest_of
from ring_train.data.packing import collate
from ring_train.data.tokenizers import Tokenizer
from ring_train.data.microbatch import Microbatch


@dataclass(frozen=True)
class BatchLayout:
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("seq_length", "global_batch_size", "micro_batch_size", "dp_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive.")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"dp_rank={self.dp_rank} must be in [0, dp_size={self.dp_size}).")
        if self.global_batch_size % self.samples_per_round:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size * data-parallel size = {self.samples_per_round}."
            )

    @property
    def samples_per_round(self) -> int:
        """Samples of one micro-batch on every DP rank."""
        return self.micro_batch_size * self.dp_size

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per optimizer step on each DP rank."""
        return self.global_batch_size // self.samples_per_round

    def rank_indices(self, first_sample: int, num_samples: int) -> Iterator[List[int]]:
        """Dataset indices of this rank's micro-batches among the global samples
        [first_sample, first_sample + num_samples)."""
        offset = self.dp_rank * self.micro_batch_size
        for start in range(first_sample, first_sample + num_samples, self.samples_per_round):
            yield list(range(start + offset, start + offset + self.micro_batch_size))


class _MicrobatchLoader:
    """Loads this rank's micro-batches of a dataset range, packing them as configured."""

    def __init__(self, dataset, layout: BatchLayout, config: DataConfig, eod: int) -> None:
        self.dataset = dataset
        self.layout = layout
        self.num_workers = config.num_workers
        self.collate = functools.partial(collate, pack=config.reset_state_at_eod, eod=eod)

    def __call__(self, first_sample: int, num_samples: int) -> Iterator[Microbatch]:
        return iter(
            DataLoader(
                self.dataset,
                batch_sampler=self.layout.rank_indices(first_sample, num_samples),
                collate_fn=self.collate,
                num_workers=self.num_workers,
            )
        )


class TrainStream:
    """Iterator of this DP rank's micro-batches, one list of `layout.num_microbatches` per
    optimizer step, until the stage's `train_samples` are consumed."""

    def __init__(
        self,
        loader: _MicrobatchLoader,
        train_samples: int,
        fingerprint: Dict[str, Any],
    ) -> None:
        self._loader = loader
        self.layout = loader.layout
        self.train_samples = train_samples
        self.fingerprint = fingerprint
        self.consumed_samples = 0
        self._microbatches: Optional[Iterator[Microbatch]] = None

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> List[Microbatch]:
        step = self.layout.global_batch_size
        if self.consumed_samples + step > self.train_samples:
            raise StopIteration
        if self._microbatches is None:
            remaining = self.train_samples - self.consumed_samples
            self._microbatches = self._loader(self.consumed_samples, remaining - remaining % step)
        batch = [next(self._microbatches) for _ in range(self.layout.num_microbatches)]
        self.consumed_samples += step
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """Position after the last step handed out; plain Python values, equal on all DP ranks."""
        return {
            "stage": self.fingerprint["stage"],
            "seq_length": self.fingerprint["seq_length"],
            "consumed_samples": self.consumed_samples,
            "fingerprint": digest_of(self.fingerprint),
            "fingerprint_parts": self.fingerprint,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues after the position in `state`; RuntimeError ("fingerprint") when it was
        saved for other data, another seq length or another stage."""
        if state["fingerprint"] != digest_of(self.fingerprint):
            changes = differing_parts(state["fingerprint_parts"], self.fingerprint)
            raise RuntimeError(
                "data fingerprint mismatch: the saved data position belongs to other data "
                f"({'; '.join(changes)}). A position only resumes the stream it was saved from; "
                "restore the original data and settings, or start a new stage."
            )
        self.consumed_samples = state["consumed_samples"]
        self._microbatches = None


class ValidationStream:
    """The same `eval_samples` validation samples at every evaluation, as this DP rank's
    micro-batches (eval_samples / (micro_batch_size * dp_size) of them)."""

    def __init__(self, loader: _MicrobatchLoader, eval_samples: int) -> None:
        self._loader = loader
        self.eval_samples = eval_samples

    def microbatches(self) -> List[Microbatch]:
        return list(self._loader(0, self.eval_samples))


@dataclass
class DataStreams:
    train: TrainStream
    validation: Optional[ValidationStream]  # None when eval_samples is 0


def build_streams(
    config: DataConfig,
    tokenizer: Tokenizer,
    layout: BatchLayout,
    train_steps: int,
    eval_samples: int = 0,
    stage: str = "main",
) -> DataStreams:
    """Streams of one training stage. Collective under torch.distributed: all ranks call it
    together (global rank 0 builds the caches; see ring_train.data.datasets).

    `eval_samples` must be a multiple of micro_batch_size * dp_size. A new stage (e.g. a new
    sequence length) is a new stream starting at sample 0 of its own shuffle.
    """
    if eval_samples % layout.samples_per_round:
        raise ConfigError(
            f"eval_samples={eval_samples} is not a multiple of micro_batch_size * "
            f"data-parallel size = {layout.samples_per_round}."
        )
    if eval_samples and config.validation_fraction == 0:
        raise ConfigError(
            f"eval_samples={eval_samples} but data.validation_fraction=0 holds out nothing; "
            f"set data.validation_fraction > 0 or evaluate no samples."
        )
    train_samples = train_steps * layout.global_batch_size
    blend = resolve_blend(config)
    train, valid = build_datasets(
        config, tokenizer, blend, layout.seq_length, train_samples, eval_samples
    )
    fingerprint = {
        "stage": stage,
        "seq_length": layout.seq_length,
        "blend": blend.describe(),
        "tokenizer": tokenizer.unique_identifiers,
        "seed": config.seed,
        "validation_fraction": config.validation_fraction,
        # megatron-core sizes its epochs and shuffles by the samples requested.
        "train_samples": train_samples,
    }
    loader = functools.partial(_MicrobatchLoader, layout=layout, config=config, eod=tokenizer.eod)
    validation = None
    if eval_samples:
        validation = ValidationStream(loader(valid), eval_samples)
    return DataStreams(TrainStream(loader(train), train_samples, fingerprint), validation)
