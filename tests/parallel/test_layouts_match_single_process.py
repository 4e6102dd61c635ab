"""Each parallel layout trains the tiny GPT exactly like one process: same loss and grad norm
after every one of 3 optimizer steps (fp32, relative difference < 1e-6). So does a run resumed
from a checkpoint saved under another layout.

One launch per world size runs all of that world's layouts one after another.
"""

import os

import pytest

from ring_train.testing.multiprocess import run_ranks

from .tiny_gpt import Layout, train, train_resumed

pytestmark = pytest.mark.slow

RTOL = 1e-6
STEPS = 3

LAYOUTS = {
    "tp2_sequence_parallel": Layout(tp=2),
    "pp2": Layout(pp=2),
    "pp2_vpp2": Layout(pp=2, vpp=2, num_layers=4),
    "ep2_alltoall": Layout(moe=True, ep=2),
    "ep2_allgather": Layout(moe=True, ep=2, dispatcher="allgather"),
    "dp2_distributed_optimizer": Layout(distopt=True),
    "tp2_ep2_alltoall": Layout(moe=True, tp=2, ep=2),
    "tp2_ep2_allgather": Layout(moe=True, tp=2, ep=2, dispatcher="allgather"),
}

# name -> (layout saved from after step 0, layout resumed in for the remaining steps)
RESHARDED = {
    "dp2_distopt_to_tp2_distopt": (Layout(distopt=True), Layout(tp=2, distopt=True)),
    "tp2_to_pp2": (Layout(tp=2), Layout(pp=2)),
}

# Interleaved PP on gloo with megatron-core's default batched p2p, expected to come out wrong:
# the reason for pipeline_comm_kwargs().
VPP_BATCHED_P2P = Layout(pp=2, vpp=2, num_layers=4, config_overrides={"batch_p2p_comm": True})

RUNS = {**LAYOUTS, **RESHARDED, "vpp_batched_p2p": VPP_BATCHED_P2P}
FOUR_RANKS = {"tp2_ep2_alltoall", "tp2_ep2_allgather"}  # the others run on two


def _single_process_runs(rank):
    layouts = {l.model_kind: Layout(moe=l.moe, num_layers=l.num_layers) for l in LAYOUTS.values()}
    return {kind: train(layout, STEPS) for kind, layout in layouts.items()}


def _parallel_runs(rank, runs, directory):
    results = {}
    for name, run in runs.items():
        if isinstance(run, Layout):
            results[name] = train(run, STEPS)
        else:
            saved, resumed = run
            results[name] = train_resumed(saved, resumed, os.path.join(directory, name), STEPS)
    return results


@pytest.fixture(scope="module")
def reference():
    """model kind -> single-process history."""
    return run_ranks(_single_process_runs, 1, timeout=300)[0]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    """name -> one history per rank; a rank off the last pipeline stage reports loss None."""
    results = {}
    for world in (2, 4):
        runs = {name: run for name, run in RUNS.items() if (name in FOUR_RANKS) == (world == 4)}
        directory = str(tmp_path_factory.mktemp(f"world{world}"))
        per_rank = run_ranks(_parallel_runs, world, runs, directory, timeout=300)
        for name in runs:
            results[name] = [rank_results[name] for rank_results in per_rank]
    return results


def _mismatches(histories, want):
    """(rank, step, key, got, want) for every number off by more than RTOL."""
    bad = []
    for rank, history in enumerate(histories):
        assert len(history) == len(want)
        for step, (got_step, want_step) in enumerate(zip(history, want)):
            for key, value in want_step.items():
                got = got_step[key]
                if got is not None and abs(got - value) > RTOL * abs(value):
                    bad.append((rank, step, key, got, value))
    return bad


def _reported_losses(histories):
    return sum(step["loss"] is not None for history in histories for step in history)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, parallel):
    histories = parallel[name]
    assert _reported_losses(histories) > 0
    assert _mismatches(histories, reference[LAYOUTS[name].model_kind]) == []


@pytest.mark.parametrize("name", list(RESHARDED))
def test_resume_from_checkpoint_saved_under_another_layout(name, reference, parallel):
    histories = parallel[name]
    assert _reported_losses(histories) > 0
    assert _mismatches(histories, reference[RESHARDED[name][0].model_kind][1:]) == []


def test_interleaved_pipeline_with_batched_p2p_on_gloo_is_still_wrong(reference, parallel):
    # If this fails, megatron-core or gloo fixed the pairing and pipeline_comm_kwargs() can go.
    assert _mismatches(parallel["vpp_batched_p2p"], reference[VPP_BATCHED_P2P.model_kind]) != []
