"""Which checkpoint is the latest: the tracker file is the authority, incomplete saves are
never chosen, and a damaged tracker or an empty path is an error naming it. Directory trees are
built by hand here (a marker file is what makes a checkpoint complete)."""

import pytest

from ring_train.checkpoint.atomic_io import publish_dir, write_atomically
from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.layout import (
    MARKER_FILE,
    TRACKER_FILE,
    checkpoint_path,
    complete_checkpoints,
    find_latest,
    in_progress_path,
    resolve_checkpoint,
)
from ring_train.checkpoint.publish import prune


def _complete(save_dir, step):
    path = checkpoint_path(save_dir, step)
    path.mkdir(parents=True)
    (path / MARKER_FILE).write_text("{}")
    return path


def _track(save_dir, step):
    write_atomically(save_dir / TRACKER_FILE, checkpoint_path(save_dir, step).name + "\n")


def test_latest_is_what_the_tracker_names_never_an_incomplete_save(tmp_path):
    _complete(tmp_path, 10)
    _complete(tmp_path, 20)
    _track(tmp_path, 20)
    in_progress_path(tmp_path, 30).mkdir()  # a save of step 30 crashed before its marker
    incomplete = checkpoint_path(tmp_path, 40)
    incomplete.mkdir()  # renamed but never marked: not a checkpoint either
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 20)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["iter_0000010", "iter_0000020"]
    assert resolve_checkpoint(tmp_path) == checkpoint_path(tmp_path, 20)


def test_nothing_saved_yet_is_none(tmp_path):
    assert find_latest(tmp_path / "never-created") is None
    in_progress_path(tmp_path, 10).mkdir()
    assert find_latest(tmp_path) is None


@pytest.mark.parametrize("content", ["garbage\n", "iter_12\n", "../iter_0000010\n", ""])
def test_garbage_tracker_is_an_error_naming_it(tmp_path, content):
    _complete(tmp_path, 10)
    (tmp_path / TRACKER_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=f"tracker file {tmp_path / TRACKER_FILE}"):
        find_latest(tmp_path)


def test_tracker_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    checkpoint_path(tmp_path, 10).mkdir()
    _track(tmp_path, 10)
    with pytest.raises(CheckpointError, match="is incomplete"):
        find_latest(tmp_path)


def test_missing_tracker_beside_complete_checkpoints_is_an_error(tmp_path):
    _complete(tmp_path, 10)
    with pytest.raises(CheckpointError, match="no 'latest' tracker"):
        find_latest(tmp_path)


def test_missing_empty_or_unfinished_load_paths_are_errors_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'absent'} does not exist"):
        resolve_checkpoint(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty'} is empty"):
        resolve_checkpoint(tmp_path / "empty")
    unfinished = in_progress_path(tmp_path, 10)
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint(unfinished)


def test_publishing_over_an_existing_checkpoint_replaces_it(tmp_path):
    old = _complete(tmp_path, 10)
    (old / "old-file").write_text("old")
    staging = in_progress_path(tmp_path, 10)
    staging.mkdir()
    (staging / MARKER_FILE).write_text("{}")
    publish_dir(staging, old)
    assert sorted(p.name for p in old.iterdir()) == [MARKER_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010"]


def test_prune_keeps_the_newest_and_the_tracked_and_drops_crashed_saves(tmp_path):
    for step in (10, 20, 30, 40):
        _complete(tmp_path, step)
    in_progress_path(tmp_path, 50).mkdir()
    _track(tmp_path, 10)  # e.g. a run that went back to step 10
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000010", "iter_0000030", "iter_0000040", TRACKER_FILE
    ]
