"""Small byte-tokenized datasets and DataConfigs over them, made fresh in each test."""

import pytest

from ring_train.config.data import DataConfig
from ring_train.data.preprocess import write_dataset
from ring_train.data.tokenizers import ByteTokenizer


def documents(count, seed=0):
    """`count` byte documents of varied length (1 to ~60 bytes): small enough that a
    16-token sample often spans several documents."""
    return [f"doc{seed}-{i} " * (1 + (i * 7 + seed) % 9) for i in range(count)]


@pytest.fixture
def make_dataset(tmp_path):
    """Writes byte-tokenized `docs` to tmp_path/<name>.bin/.idx; returns the prefix."""

    def make(name, docs):
        prefix = str(tmp_path / "data" / name)
        write_dataset(prefix, docs, ByteTokenizer())
        return prefix

    return make


@pytest.fixture
def config_for(tmp_path):
    """DataConfig over weighted prefixes, cached under tmp_path, loading in-process."""

    def config(*weighted_prefixes, **overrides):
        blend = [{"path": prefix, "weight": weight} for prefix, weight in weighted_prefixes]
        values = dict(blend=blend, cache_dir=str(tmp_path / "cache"), num_workers=0)
        return DataConfig(**{**values, **overrides})

    return config
