"""Loading refuses what it cannot use, with an error naming the file or key, before anything
is read into the model and without writing anything (RELIABILITY tests 8 and 9): a flipped
byte, a truncated shard, a garbage tracker, a missing or empty path, a checkpoint of another
model shape, one with a layer too many or too few, and a weights-only checkpoint where a
training checkpoint is needed. It never falls back to the model's initialization."""

import shutil
from pathlib import Path

import pytest
import torch

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.layout import TRACKER_FILE, checkpoint_path
from ring_train.checkpoint.trainer_state import TrainerState
from ring_train.checkpoint.training_checkpoint import (
    checkpoint_to_resume,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from ring_train.config.checkpoint import CheckpointConfig
from ring_train.testing.multiprocess import run_ranks
from tests.checkpoint.tiny_training import Layout, build, parameters, train

pytestmark = pytest.mark.slow

WIDER = {"hidden_size": 96}
DEEPER = {"num_hidden_layers": 5}


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def _flip_a_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-100])


def _largest_shard(checkpoint: Path) -> Path:
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _attempt(load, run) -> dict:
    """Run `load` on `run`; the error it raised and whether the model or the saved files
    changed."""
    before = parameters(run)
    try:
        load()
        error = None
    except CheckpointError as exc:
        error = str(exc)
    after = parameters(run)
    return {"error": error, "model_changed": any(not torch.equal(before[k], after[k]) for k in before)}


def _scenarios(rank, root):
    root = Path(root)
    good = root / "good"
    run = build(Layout())
    train(run, range(1))
    save_checkpoint(good, run.model, run.optimizer, TrainerState(step=1))
    deeper = build(Layout(), model_overrides=DEEPER)
    save_weights(root / "deeper", 1, deeper.model)
    save_weights(root / "weights", 1, run.model)

    damaged = {}
    for name, damage in (("flipped", _flip_a_byte), ("truncated", _truncate)):
        copy = root / name
        shutil.copytree(good, copy)
        shard = _largest_shard(checkpoint_path(copy, 1))
        damage(shard)
        damaged[name] = str(shard)
    shutil.copytree(good, root / "garbage-tracker")
    (root / "garbage-tracker" / TRACKER_FILE).write_text("not a checkpoint name\n")
    (root / "empty").mkdir()

    saved_files = _files(good)
    fresh = build(Layout())
    outcomes = {
        name: _attempt(lambda path=path: load_checkpoint(path, fresh.model, fresh.optimizer), fresh)
        for name, path in (
            ("flipped", root / "flipped"),
            ("truncated", root / "truncated"),
            ("garbage-tracker", root / "garbage-tracker"),
            ("missing", root / "absent"),
            ("empty", root / "empty"),
            ("weights-only", root / "weights"),
        )
    }
    outcomes["one layer too few"] = _attempt(
        lambda: load_weights(root / "deeper", fresh.model), fresh
    )
    for name, overrides in (("wider", WIDER), ("one layer too many", DEEPER)):
        other = build(Layout(), model_overrides=overrides)
        outcomes[name] = _attempt(lambda: load_checkpoint(good, other.model, other.optimizer), other)
    outcomes["good unchanged"] = _files(good) == saved_files
    try:
        checkpoint_to_resume(CheckpointConfig(save_dir=str(root / "empty"), exit_on_missing_checkpoint=True))
        outcomes["exit on missing"] = None
    except CheckpointError as exc:
        outcomes["exit on missing"] = str(exc)
    outcomes["start fresh"] = checkpoint_to_resume(CheckpointConfig(save_dir=str(root / "empty")))
    return outcomes, damaged


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("load-errors")
    outcomes, damaged = run_ranks(_scenarios, 1, str(root), timeout=300)[0]
    return outcomes, damaged, root


def _check(outcome, *fragments):
    assert outcome["error"] is not None, "loaded without an error"
    for fragment in fragments:
        assert fragment in outcome["error"], outcome["error"]
    assert not outcome["model_changed"]


def test_flipped_byte_names_the_file_and_both_digests(outcomes):
    results, damaged, _ = outcomes
    _check(results["flipped"], f"checkpoint file {damaged['flipped']} is corrupted: SHA-256",
           "the completion marker records")


def test_truncated_shard_names_the_file(outcomes):
    results, damaged, _ = outcomes
    _check(results["truncated"], f"checkpoint file {damaged['truncated']} has", "truncated")


def test_garbage_tracker_names_the_tracker_file(outcomes):
    results, _, root = outcomes
    _check(results["garbage-tracker"], f"tracker file {root / 'garbage-tracker' / TRACKER_FILE}",
           "'not a checkpoint name'")


def test_missing_or_empty_path_is_an_error(outcomes):
    results, _, root = outcomes
    _check(results["missing"], f"checkpoint path {root / 'absent'} does not exist")
    _check(results["empty"], f"checkpoint directory {root / 'empty'} is empty")


def test_weights_only_checkpoint_does_not_resume_training(outcomes):
    results, _, _ = outcomes
    _check(results["weights-only"], "holds weights only", "load_weights")


def test_other_hidden_size_names_the_first_key_and_both_shapes(outcomes):
    results, _, _ = outcomes
    _check(results["wider"], "shape mismatch for embedding.word_embeddings.weight",
           "has (512, 64), the model expects (512, 96)")


def test_a_layer_too_many_in_the_model_is_a_missing_key(outcomes):
    results, _, _ = outcomes
    _check(results["one layer too many"], "missing key in checkpoint", "decoder.layers.4.",
           "the model expects shape (")


def test_a_layer_too_many_in_the_checkpoint_is_an_unexpected_key(outcomes):
    results, _, _ = outcomes
    _check(results["one layer too few"], "unexpected key in checkpoint", "decoder.layers.4.",
           "the model has no such tensor")


def test_failed_loads_write_nothing(outcomes):
    results, _, _ = outcomes
    assert results["good unchanged"]


def test_no_checkpoint_to_resume_is_an_error_or_a_logged_fresh_start(outcomes):
    results, _, root = outcomes
    assert "no checkpoint to resume in" in results["exit on missing"]
    assert results["start fresh"] is None
