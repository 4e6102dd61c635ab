"""run_ranks: results in rank order, torchrun-like env, failures and hangs reach the caller."""

import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from ring_train.testing.multiprocess import RankFailed, run_ranks

pytestmark = pytest.mark.slow


def _report_env(rank):
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    names += ["TORCHDYNAMO_DISABLE", "OMP_NUM_THREADS"]
    return rank, {name: os.environ.get(name) for name in names}


def _sum_of_ranks_over_gloo(rank, offset):
    import torch

    dist.init_process_group("gloo")
    value = torch.tensor(float(rank + offset))
    dist.all_reduce(value)
    dist.destroy_process_group()
    return value.item()


def _rank_one_raises_while_rank_zero_hangs(rank):
    if rank == 1:
        raise ValueError("rank one broke")
    time.sleep(600)


def _exit_without_result(rank):
    os._exit(3)


def _start_sleeper_then_hang(rank, pid_dir):
    # A grandchild, like the writer process dist_checkpointing starts.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    for pid, name in [(os.getpid(), "rank"), (sleeper.pid, "grandchild")]:
        with open(os.path.join(pid_dir, f"{name}{rank}.pid"), "w") as f:
            f.write(str(pid))
    time.sleep(600)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead, just not yet reaped


def test_results_come_back_in_rank_order_with_torchrun_env():
    results = run_ranks(_report_env, 2)
    assert [rank for rank, _ in results] == [0, 1]
    envs = [env for _, env in results]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2"
        assert env["TORCHDYNAMO_DISABLE"] == "1"
        assert env["OMP_NUM_THREADS"] == "1"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"]


def test_ranks_can_form_a_gloo_group_and_receive_arguments():
    assert run_ranks(_sum_of_ranks_over_gloo, 2, 10) == [21.0, 21.0]


def test_exception_on_one_rank_is_raised_with_its_traceback_without_waiting_for_the_others():
    with pytest.raises(RankFailed) as failure:
        # A timeout error here would mean the harness waited for the hung rank.
        run_ranks(_rank_one_raises_while_rank_zero_hangs, 2, timeout=120)
    assert failure.value.rank == 1
    assert failure.value.exc_type == "ValueError"
    assert "rank one broke" in str(failure.value)
    assert "_rank_one_raises_while_rank_zero_hangs" in failure.value.child_traceback


def test_rank_that_dies_without_a_result_is_a_failure():
    with pytest.raises(RankFailed, match="exited with code 3"):
        run_ranks(_exit_without_result, 1)


def test_timeout_kills_ranks_and_what_they_started(tmp_path):
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        run_ranks(_start_sleeper_then_hang, 2, str(tmp_path), timeout=6)
    pids = [int(path.read_text()) for path in tmp_path.glob("*.pid")]
    assert len(pids) == 4, "the ranks did not start in time to test the kill"
    assert not [pid for pid in pids if _is_running(pid)]
