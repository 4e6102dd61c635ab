"""Resuming from a checkpoint continues training as if it had never stopped.

* Same layout, fresh processes: losses, parameters, optimizer state (distributed Adam) and
  RNG states are bitwise equal to the run that went on (RELIABILITY test 2).
* Another layout (saved at TP2 or PP2; loaded at TP1, at the other one and at PP2 with two
  virtual stages): losses equal a TP1 continuation from the same checkpoint and the saving
  run's own continuation, to fp32 reduction-order noise (RELIABILITY test 5).
"""

import pytest
import torch

from ring_train.checkpoint.rng import capture_rng_state
from ring_train.checkpoint.trainer_state import TrainerState
from ring_train.checkpoint.training_checkpoint import load_checkpoint, save_checkpoint
from ring_train.testing.multiprocess import run_ranks
from tests.checkpoint.tiny_training import (
    ADAM_DISTRIBUTED,
    Layout,
    build,
    optimizer_tensors,
    parameters,
    rng_batch,
    train,
)

pytestmark = pytest.mark.slow

REL_TOL = 1e-6
SAVED_STATE = TrainerState(
    step=3,
    stage="4k",
    stage_step=3,
    consumed_samples=12,
    consumed_tokens=384,
    data_loader={"samples": 12, "epoch": 0},
    lr_scheduler={"num_steps": 3, "max_lr": 1e-3},
    config={"recipe": "tiny"},
)


def _rng_fingerprint() -> dict:
    state = capture_rng_state()
    return {"torch": state["torch"], "tracker": state["tracker"], "numpy": state["numpy"][1]}


def _final(run, losses) -> dict:
    return {
        "losses": losses,
        "parameters": parameters(run),
        "optimizer": optimizer_tensors(run),
        "rng": _rng_fingerprint(),
    }


def _train_six_steps_saving_after_three(rank, save_dir):
    run = build(Layout(), ADAM_DISTRIBUTED)
    losses = train(run, range(3), rng_batch)
    save_checkpoint(save_dir, run.model, run.optimizer, SAVED_STATE)
    return _final(run, losses + train(run, range(3, 6), rng_batch))


def _resume_and_train_three_steps(rank, save_dir):
    # Another seed: whatever the resumed run draws must come from the checkpoint.
    run = build(Layout(), ADAM_DISTRIBUTED, seed=4321)
    state = load_checkpoint(save_dir, run.model, run.optimizer)
    return state, _final(run, train(run, range(3, 6), rng_batch))


@pytest.fixture(scope="module")
def same_layout(tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("same-layout"))
    straight = run_ranks(_train_six_steps_saving_after_three, 2, save_dir, timeout=300)
    resumed = run_ranks(_resume_and_train_three_steps, 2, save_dir, timeout=300)
    return straight, resumed


def test_resume_at_the_same_layout_is_bitwise_exact(same_layout):
    straight, resumed = same_layout
    for rank, (want, (state, got)) in enumerate(zip(straight, resumed)):
        assert state == SAVED_STATE
        assert got["losses"] == want["losses"][3:], rank
        assert want["losses"][3] != want["losses"][5]  # it trained
        assert want["parameters"].keys() == got["parameters"].keys()
        for name, tensor in want["parameters"].items():
            assert torch.equal(tensor, got["parameters"][name]), (rank, name)
        assert len(want["optimizer"]) == len(got["optimizer"]) > 0
        for index, (a, b) in enumerate(zip(want["optimizer"], got["optimizer"])):
            assert torch.equal(a, b), (rank, index)
        assert torch.equal(want["rng"]["torch"], got["rng"]["torch"])
        assert (want["rng"]["numpy"] == got["rng"]["numpy"]).all()
        for name, tracker_state in want["rng"]["tracker"].items():
            assert torch.equal(tracker_state, got["rng"]["tracker"][name]), name


# --- another layout -----------------------------------------------------------------------

SAVED_AT = {"tp2": Layout(tp=2), "pp2": Layout(pp=2)}
# (name, layout, checkpoint it resumes from); the interleaved one loads into 2 model chunks.
CROSS_LOADS = [
    ("tp2", Layout(tp=2), "pp2"),
    ("pp2", Layout(pp=2), "tp2"),
    ("pp2-vpp2", Layout(pp=2, vpp=2), "tp2"),
]
RESUMED_STEPS = range(2, 4)


def _save_at_two_rank_layouts_then_cross_load(rank, directory):
    """For each two-rank layout: 2 steps, save, 2 more steps (the uninterrupted losses); then
    each layout resumes from the other's checkpoint."""
    losses = {}
    for name, layout in SAVED_AT.items():
        run = build(layout)
        train(run, range(2))
        save_checkpoint(f"{directory}/{name}", run.model, run.optimizer, TrainerState(step=2))
        losses[f"{name} uninterrupted"] = train(run, RESUMED_STEPS)
    for name, layout, source in CROSS_LOADS:
        run = build(layout)
        load_checkpoint(f"{directory}/{source}", run.model, run.optimizer)
        losses[f"{name} from {source}"] = train(run, RESUMED_STEPS)
    return losses


def _resume_each_in_one_process(rank, directory):
    losses = {}
    for source in SAVED_AT:
        run = build(Layout())
        load_checkpoint(f"{directory}/{source}", run.model, run.optimizer)
        losses[f"tp1 from {source}"] = train(run, RESUMED_STEPS)
    return losses


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("resharded"))
    two_ranks = run_ranks(_save_at_two_rank_layouts_then_cross_load, 2, directory, timeout=300)
    one_rank = run_ranks(_resume_each_in_one_process, 1, directory, timeout=300)[0]
    return two_ranks, one_rank


def _close(got, want):
    return all(abs(g - w) <= REL_TOL * abs(w) for g, w in zip(got, want)) and len(got) == len(want)


@pytest.mark.parametrize(
    "resumed, source",
    [("pp2 from tp2", "tp2"), ("pp2-vpp2 from tp2", "tp2"), ("tp2 from pp2", "pp2"),
     ("tp2 uninterrupted", "tp2"), ("pp2 uninterrupted", "pp2")],
)
def test_resume_at_another_layout_matches_a_tp1_continuation(resharded, resumed, source):
    two_ranks, one_rank = resharded
    reference = one_rank[f"tp1 from {source}"]
    assert reference[0] != reference[1]
    for rank, losses in enumerate(two_ranks):
        assert _close(losses[resumed], reference), (rank, losses[resumed], reference)
