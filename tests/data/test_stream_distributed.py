"""Under torch.distributed: rank 0 builds the caches in data.cache_dir, every rank gets the
same share as without a process group, and a cache directory the ranks do not share, or a
failure on rank 0, is raised on every rank instead of hanging or failing later."""

import os
from pathlib import Path

import pytest
import torch

from ring_train.config.data import DataConfig
from ring_train.data.datasets import from_rank_zero
from ring_train.data.stream import BatchLayout, build_streams
from ring_train.data.tokenizers import ByteTokenizer
from ring_train.testing.multiprocess import run_ranks
from tests.data.conftest import documents

pytestmark = pytest.mark.slow


def _config(web, cache_dir):
    blend = [{"path": "default", "weight": 1.0}, {"path": web, "weight": 1.0}]
    return DataConfig(blend=blend, cache_dir=cache_dir, num_workers=0, validation_fraction=0.1)


def _tokens(config, rank):
    layout = BatchLayout(32, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=2)
    stream = build_streams(config, ByteTokenizer(), layout, train_steps=3).train
    return [[batch.tokens for batch in step] for step in stream]


def _fails_on_rank_zero():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        raise OSError("disk full")
    return "built"


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _two_ranks(rank, web, cache_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        shared = _tokens(_config(web, cache_dir), rank)
        unshared = _error_of(_tokens, _config(web, os.path.join(cache_dir, f"node{rank}")), rank)
        return shared, unshared, _error_of(from_rank_zero, _fails_on_rank_zero)
    finally:
        dist.destroy_process_group()


def test_ranks_share_built_caches_and_refuse_a_cache_dir_they_do_not_share(make_dataset, tmp_path):
    web = make_dataset("web", documents(40))
    data_files = sorted(os.listdir(Path(web).parent))
    cache = tmp_path / "cache"

    results = run_ranks(_two_ranks, 2, web, str(cache), timeout=120)

    for rank, (shared, unshared, rank_zero_failure) in enumerate(results):
        in_one_process = _tokens(_config(web, str(tmp_path / "local")), rank)
        assert all(
            torch.equal(a, b) for x, y in zip(shared, in_one_process) for a, b in zip(x, y)
        )
        assert unshared.startswith("ConfigError") and "is not shared: ranks [1]" in unshared
    assert results[0][2] == "OSError: disk full"
    assert results[1][2] == "RuntimeError: rank 0 failed to prepare the data: OSError: disk full"
    assert sorted(os.listdir(Path(web).parent)) == data_files  # nothing written beside the data
    assert list(cache.glob("corpus/*.bin")) and list(cache.glob("indices/*/*.npy"))
