"""WSM on the tiny hybrid model at TP2: weights-only candidates saved while training, the last
N merged on one rank while the other waits, and the merged checkpoint loaded back at TP2 holds
the weighted sum of the candidates' weights (uniform: their mean)."""

import pytest
import torch
import torch.distributed as dist

from ring_train.checkpoint.layout import complete_checkpoints
from ring_train.checkpoint.training_checkpoint import load_weights, save_weights
from ring_train.checkpoint.wsm import merge_window
from ring_train.config.checkpoint import WSMConfig
from ring_train.testing.multiprocess import run_ranks
from tests.checkpoint.tiny_training import Layout, build, parameters, train

pytestmark = pytest.mark.slow

CUSTOM = WSMConfig(interval_steps=1, num_candidates=3, shape="custom", weights=[0.2, 0.3, 0.5])
UNIFORM = WSMConfig(interval_steps=1, num_candidates=3, shape="uniform")


def _train_merge_and_reload(rank, root):
    run = build(Layout(tp=2))
    candidates = f"{root}/candidates"
    weights_after_step = []
    for step in range(1, 5):
        train(run, range(step - 1, step))
        save_weights(candidates, step, run.model, keep_last=CUSTOM.num_candidates)
        weights_after_step.append(parameters(run))
    kept = [p.name for p in complete_checkpoints(candidates)]
    merged = {}
    for name, config in (("custom", CUSTOM), ("uniform", UNIFORM)):
        if rank == 0:
            merge_window(candidates, config, f"{root}/{name}")
        dist.barrier()
        fresh = build(Layout(tp=2))
        load_weights(f"{root}/{name}", fresh.model)
        merged[name] = parameters(fresh)
    return kept, weights_after_step[-3:], merged


@pytest.fixture(scope="module")
def merged_runs(tmp_path_factory):
    return run_ranks(_train_merge_and_reload, 2, str(tmp_path_factory.mktemp("wsm")), timeout=300)


def test_only_the_window_of_candidates_is_kept(merged_runs):
    for kept, _, _ in merged_runs:
        assert kept == ["iter_0000002", "iter_0000003", "iter_0000004"]


@pytest.mark.parametrize("name, config", [("custom", CUSTOM), ("uniform", UNIFORM)])
def test_merged_model_is_the_weighted_sum_of_the_candidates(merged_runs, name, config):
    weights = config.weights or [1 / 3] * 3
    for rank, (_, candidates, merged) in enumerate(merged_runs):
        assert merged[name].keys() == candidates[0].keys()
        for key, tensor in merged[name].items():
            want = sum(w * c[key] for w, c in zip(weights, candidates))
            assert torch.allclose(tensor, want, rtol=1e-6, atol=1e-7), (rank, key)
        # The candidates differ, so the sum is not trivially any one of them.
        assert any(not torch.equal(candidates[0][k], candidates[2][k]) for k in candidates[0])
