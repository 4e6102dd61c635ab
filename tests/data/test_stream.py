"""The training stream: megatron's order split over DP ranks, exact resume, fingerprints."""

import json
from collections import Counter

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ring_train.config.errors import ConfigError
from ring_train.data.preprocess import write_dataset
from ring_train.data.stream import BatchLayout, build_streams
from ring_train.data.tokenizers import ByteTokenizer
from tests.data.conftest import documents

SEQ = 16
FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")


def _streams(config, dp_rank=0, dp_size=2, train_steps=60, eval_samples=0, **layout):
    layout = BatchLayout(
        **{"seq_length": SEQ, "global_batch_size": 8, "micro_batch_size": 2, **layout},
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return build_streams(config, ByteTokenizer(), layout, train_steps, eval_samples)


@pytest.fixture
def blend(make_dataset, config_for):
    """Two datasets weighted 1:2, small enough that 40 steps of 8 samples run through the
    first about once and the second about three times."""
    web = make_dataset("web", documents(40, seed=0))
    code = make_dataset("code", documents(30, seed=1))
    web_dataset = IndexedDataset(web)  # its arrays are views of a mmap it closes when collected
    tokens = int(web_dataset.sequence_lengths.sum())
    assert tokens * 0.9 / SEQ < 40 * 8 / 3  # the first dataset's epoch ends within 40 steps

    def config(web_weight=1.0, **overrides):
        overrides = {"validation_fraction": 0.1, **overrides}
        return config_for((web, web_weight), (code, 2.0), **overrides)

    config.paths = (web, code)
    return config


def _assert_steps_equal(expected, actual):
    assert len(expected) == len(actual)
    for step_a, step_b in zip(expected, actual):
        assert len(step_a) == len(step_b)
        for a, b in zip(step_a, step_b):
            for field in FIELDS:
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or torch.equal(x, y), field


def test_dp_shares_are_disjoint_and_make_the_global_batch_in_megatron_order(blend):
    config = blend(reset_state_at_eod=False)
    whole = _streams(config, dp_size=1).train
    ranks = [_streams(config, dp_rank=r, dp_size=2).train for r in (0, 1)]
    assert whole.layout.num_microbatches == 4 and ranks[0].layout.num_microbatches == 2
    for _ in range(6):
        global_rows = torch.cat([batch.tokens for batch in next(whole)])
        shares = [next(rank) for rank in ranks]
        # Round k of micro-batches: rank 0 takes samples [4k, 4k+2), rank 1 [4k+2, 4k+4).
        rebuilt = torch.cat([shares[r][k].tokens for k in range(2) for r in range(2)])
        assert torch.equal(rebuilt, global_rows)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_every_sample_index_goes_to_exactly_one_rank(dp_size):
    layouts = [BatchLayout(SEQ, 16, 2, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    taken = [i for layout in layouts for batch in layout.rank_indices(32, 48) for i in batch]
    assert sorted(taken) == list(range(32, 80))


def test_one_epoch_over_all_dp_ranks_holds_every_token_exactly_once(make_dataset, config_for):
    docs = documents(30)
    total = sum(len(d) + 1 for d in docs)
    # Pad the last document so the epoch is 12 steps of 4 samples plus the one extra token the
    # last sample reads as its final label (always that document's EOD).
    docs[-1] += "x" * ((1 - total) % (4 * SEQ))
    total = sum(len(d) + 1 for d in docs)
    steps = (total - 1) // (4 * SEQ)
    config = config_for((make_dataset("web", docs), 1.0), validation_fraction=0.0)
    seen = Counter()
    for rank in (0, 1):
        streams = _streams(
            config, rank, 2, train_steps=steps, global_batch_size=4, micro_batch_size=1
        )
        for step in streams.train:
            for batch in step:
                seen.update(batch.tokens.flatten().tolist())
    all_tokens = Counter(t for d in docs for t in list(d.encode()) + [ByteTokenizer.eod])
    assert seen + Counter([ByteTokenizer.eod]) == all_tokens


@pytest.mark.parametrize("pack", [True, False])
def test_resume_after_40_steps_repeats_the_next_8_steps_exactly_on_each_dp_rank(blend, pack):
    config = blend(reset_state_at_eod=pack, eod_mask_loss=True)
    for rank in (0, 1):
        first = _streams(config, dp_rank=rank).train
        for _ in range(40):
            next(first)
        # The state is plain data: it survives JSON (and so any checkpoint format).
        state = json.loads(json.dumps(first.state_dict()))
        expected = [next(first) for _ in range(8)]

        resumed = _streams(config, dp_rank=rank).train
        resumed.load_state_dict(state)
        _assert_steps_equal(expected, [next(resumed) for _ in range(8)])
        assert state["consumed_samples"] == 320 and resumed.consumed_samples == 384


def test_a_position_saved_at_one_dp_size_resumes_at_another(blend):
    config = blend(reset_state_at_eod=False)
    two = [_streams(config, dp_rank=r, dp_size=2).train for r in (0, 1)]
    for _ in range(5):
        for stream in two:
            next(stream)
    one = _streams(config, dp_size=1).train
    one.load_state_dict(two[0].state_dict())
    shares = [next(stream) for stream in two]
    rebuilt = torch.cat([shares[r][k].tokens for k in range(2) for r in range(2)])
    assert torch.equal(torch.cat([b.tokens for b in next(one)]), rebuilt)


def test_a_rewritten_data_file_is_refused_by_fingerprint(blend):
    stream = _streams(blend()).train
    next(stream)
    state = stream.state_dict()
    # Same document lengths, other bytes: only the content tells them apart.
    rewritten = [d.upper() for d in documents(40, seed=0)]
    write_dataset(blend.paths[0], rewritten, ByteTokenizer())
    with pytest.raises(RuntimeError, match="fingerprint mismatch.*blend"):
        _streams(blend()).train.load_state_dict(state)


@pytest.mark.parametrize(
    "change, part",
    [
        (dict(web_weight=3.0), "blend"),
        (dict(seed=7), "seed"),
        (dict(validation_fraction=0.2), "validation_fraction"),
    ],
)
def test_a_changed_blend_or_shuffle_is_refused_by_fingerprint(blend, change, part):
    state = _streams(blend()).train.state_dict()
    with pytest.raises(RuntimeError, match=f"fingerprint.*{part}"):
        _streams(blend(**change)).train.load_state_dict(state)


def test_a_new_sequence_length_is_a_new_stream(blend):
    state = _streams(blend()).train.state_dict()
    assert (state["stage"], state["seq_length"]) == ("main", SEQ)
    longer = _streams(blend(), seq_length=2 * SEQ).train
    with pytest.raises(RuntimeError, match=f"fingerprint.*seq_length: {SEQ} -> {2 * SEQ}"):
        longer.load_state_dict(state)


def test_stream_ends_after_its_train_steps(blend):
    assert len(list(_streams(blend(), train_steps=3).train)) == 3


def test_worker_processes_give_the_same_batches(blend):
    in_process = _streams(blend(num_workers=0), train_steps=3).train
    workers = _streams(blend(num_workers=1), train_steps=3).train
    _assert_steps_equal(list(in_process), list(workers))


def test_validation_stream_gives_the_same_held_out_samples_every_time(blend):
    streams = _streams(blend(), dp_rank=1, eval_samples=8)
    first = streams.validation.microbatches()
    assert len(first) == 8 // (2 * 2)
    _assert_steps_equal([first], [streams.validation.microbatches()])
    rows = lambda batches: {tuple(r) for b in batches for r in b.tokens.view(-1, SEQ).tolist()}
    train_rows = set().union(*(rows(step) for step in streams.train))
    assert not rows(first) & train_rows


def test_no_validation_stream_without_eval_samples(blend):
    assert _streams(blend()).validation is None


def test_bad_batch_geometry_is_refused(blend):
    with pytest.raises(ConfigError, match="global_batch_size=6 is not a multiple"):
        BatchLayout(SEQ, 6, 2, dp_size=2)
    with pytest.raises(ConfigError, match="eval_samples=6"):
        _streams(blend(), eval_samples=6)
    with pytest.raises(ConfigError, match="data.validation_fraction=0"):
        _streams(blend(validation_fraction=0.0), eval_samples=8)


def test_a_split_that_leaves_a_dataset_without_validation_documents_is_refused(
    make_dataset, config_for
):
    prefix = make_dataset("small", documents(20))
    expected = r"data.validation_fraction.*valid split of .*small \(20 documents\)"
    with pytest.raises(ConfigError, match=expected):
        _streams(config_for((prefix, 1.0), validation_fraction=0.01))
