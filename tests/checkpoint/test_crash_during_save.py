"""A save that dies half-way (an exception in one rank's shard writer; one rank SIGKILLed while
writing) leaves `latest` on the previous checkpoint, the broken save unmarked under its .tmp
name, and the previous checkpoint loads and continues exactly like the run that went on
(RELIABILITY test 6)."""

import functools
import json
import os
import signal
from pathlib import Path

import pytest

from megatron.core.dist_checkpointing.strategies import filesystem_async

from ring_train.checkpoint.layout import (
    MARKER_FILE,
    TRACKER_FILE,
    checkpoint_path,
    find_latest,
    in_progress_path,
)
from ring_train.checkpoint.trainer_state import TrainerState
from ring_train.checkpoint.training_checkpoint import load_checkpoint, save_checkpoint
from ring_train.testing.multiprocess import RankFailed, run_ranks
from tests.checkpoint.tiny_training import Layout, build, train

pytestmark = pytest.mark.slow

SHARDS_BEFORE_FAILURE = 3
UNINTERRUPTED = "uninterrupted.json"
INJECTED = "failure-injected"
# Tensor parallel, so that rank 1 holds shards of its own to write (under data parallelism it
# would only hold replicas, which rank 0 writes).
LAYOUT = Layout(tp=2)


def _fail_in_rank1_writer(rank: int, how: str, witness: Path) -> None:
    """Make rank 1's shard writer fail after writing a few entries: raise, or SIGKILL the rank
    (the writer runs in a process forked from it). `witness` is created when it fires."""
    if rank != 1:
        return
    rank_pid = os.getpid()
    write_item = filesystem_async._write_item
    written = []

    @functools.wraps(write_item)  # megatron-core reads its signature
    def failing_write_item(*args, **kwargs):
        if len(written) == SHARDS_BEFORE_FAILURE:
            witness.touch()
            if how == "exception":
                raise RuntimeError("injected failure in the shard writer")
            os.kill(rank_pid, signal.SIGKILL)
        written.append(args)
        return write_item(*args, **kwargs)

    filesystem_async._write_item = failing_write_item


def _save_then_crash_in_the_next_save(rank, save_dir, how):
    run = build(LAYOUT)
    train(run, range(2))
    save_checkpoint(save_dir, run.model, run.optimizer, TrainerState(step=2))
    losses = train(run, range(2, 4))
    if rank == 0:
        Path(save_dir, UNINTERRUPTED).write_text(json.dumps(losses))
    _fail_in_rank1_writer(rank, how, Path(save_dir, INJECTED))
    save_checkpoint(save_dir, run.model, run.optimizer, TrainerState(step=4))


def _resume_latest(rank, save_dirs):
    losses = {}
    for save_dir in save_dirs:
        run = build(LAYOUT)
        state = load_checkpoint(save_dir, run.model, run.optimizer)
        losses[save_dir] = (state.step, train(run, range(2, 4)))
    return losses


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """how -> (save dir, the failure run_ranks raised)."""
    outcomes = {}
    for how in ("exception", "sigkill"):
        save_dir = str(tmp_path_factory.mktemp(how))
        with pytest.raises(RankFailed) as failure:
            run_ranks(_save_then_crash_in_the_next_save, 2, save_dir, how, timeout=300)
        outcomes[how] = (save_dir, failure.value)
    return outcomes


@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_crash_mid_save_leaves_latest_on_the_previous_checkpoint(crashed, how):
    save_dir, failure = crashed[how]
    save_dir = Path(save_dir)
    assert (save_dir / INJECTED).exists()  # the failure fired while rank 1 wrote its shards
    if how == "exception":  # megatron-core reports the writer's failure on every rank
        assert failure.exc_type == "CheckpointException"
    broken = in_progress_path(save_dir, 4)
    assert any(broken.glob("*.distcp")), "the crash came after some shards were written"
    assert not (broken / MARKER_FILE).exists()
    assert not checkpoint_path(save_dir, 4).exists()
    assert (save_dir / TRACKER_FILE).read_text() == "iter_0000002\n"
    assert find_latest(save_dir) == checkpoint_path(save_dir, 2)


def test_the_previous_checkpoint_resumes_exactly(crashed):
    save_dirs = [crashed[how][0] for how in ("exception", "sigkill")]
    resumed = run_ranks(_resume_latest, 2, save_dirs, timeout=300)
    for save_dir in save_dirs:
        uninterrupted = json.loads(Path(save_dir, UNINTERRUPTED).read_text())
        for rank_losses in resumed:
            assert rank_losses[save_dir] == (2, uninterrupted)
