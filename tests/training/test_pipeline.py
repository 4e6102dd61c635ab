"""The tiny recipe end to end on 2 processes: every stage ends in a WSM merge whose validation
loss beats the stage's start, and a job preempted (SIGTERM) inside a stage and again after a
stage boundary resumes to bitwise the same losses and merged models."""

import pytest
import torch

from ring_train.checkpoint.layout import wsm_merged_path
from ring_train.checkpoint.streaming import CheckpointReader
from ring_train.training.preemption import PREEMPTED_EXIT_CODE
from tests.training import launcher

STAGES = ("s4k", "s32k", "s128k")
SHORT = [
    "recipe=tiny", "logging.wandb_mode=disabled", "checkpoint.save_interval=4",
    "stages.s4k.train_steps=12", "stages.s4k.wsm.interval_steps=2", "stages.s4k.wsm.num_candidates=3",
    "stages.s32k.train_steps=8", "stages.s32k.wsm.interval_steps=2", "stages.s32k.wsm.num_candidates=3",
    "stages.s128k.train_steps=6", "stages.s128k.wsm.interval_steps=2", "stages.s128k.wsm.num_candidates=2",
]


def _overrides(tmp_path, name):
    return SHORT + [f"output_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}"]


def _losses(output_dir):
    """(stage, step) -> training loss, and (stage, eval key) -> validation loss."""
    train, evals = {}, {}
    for record in launcher.metrics(output_dir):
        if "loss" in record:
            key = (record["stage"], record["stage_step"])
            assert key not in train, f"step {key} trained twice"
            train[key] = record["loss"]
        for name in ("eval_loss_initial", "eval_loss_merged"):
            if name in record:
                evals[(record["stage"], name)] = record[name]
    return train, evals


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    codes, output = launcher.run(_overrides(tmp, "a"))
    assert codes == [0, 0], output[-3000:]
    return tmp / "a"


@pytest.mark.slow
def test_every_stage_merges_to_a_lower_validation_loss(uninterrupted):
    train, evals = _losses(uninterrupted)
    assert len(train) == 12 + 8 + 6
    for stage in STAGES:
        assert evals[(stage, "eval_loss_merged")] < evals[(stage, "eval_loss_initial")], evals
        assert wsm_merged_path(uninterrupted / "checkpoints", stage).is_dir()
    assert (uninterrupted / "config.yaml").is_file()


@pytest.mark.slow
def test_preempted_job_resumes_bitwise_across_a_stage_boundary(uninterrupted, tmp_path):
    output_dir = tmp_path / "b"
    overrides = _overrides(tmp_path, "b")
    for stage, step in (("s4k", 5), ("s32k", 3)):
        procs = launcher.start(overrides, 2)
        launcher.terminate_when(procs, output_dir, stage, step)
        assert launcher.wait(procs) == [PREEMPTED_EXIT_CODE] * 2
    codes, output = launcher.run(overrides)
    assert codes == [0, 0], output[-3000:]

    assert _losses(output_dir) == _losses(uninterrupted)
    for stage in STAGES:
        merged = CheckpointReader(wsm_merged_path(output_dir / "checkpoints", stage))
        reference = CheckpointReader(wsm_merged_path(uninterrupted / "checkpoints", stage))
        assert merged.tensors.keys() == reference.tensors.keys()
        for key in reference.tensors:
            assert torch.equal(merged.tensor(key), reference.tensor(key)), (stage, key)
