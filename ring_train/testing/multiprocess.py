"""Run a function on N local processes with a torchrun-like environment, for gloo tests.

`run_ranks(fn, world_size, *args)` starts `world_size` fresh interpreters (spawn), runs
`fn(rank, *args)` in each and returns the ranks' return values in rank order. A failure on any
rank is raised in the caller with that rank's traceback; a job that does not finish within
`timeout` seconds is killed and raised as `TimeoutError`, because a broken collective on gloo
usually shows up as a hang rather than an error.

`fn` and its arguments are pickled by reference, so `fn` must be a module-level function of an
importable module.
"""

import contextlib
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List

import torch.multiprocessing as mp

# Children import torch in the spawn bootstrap, before `fn` runs: variables that torch reads at
# import time must already be in the environment the child starts with.
CHILD_ENV = {
    # Dynamo would compile megatron-core's jit_fuser helpers on first use: seconds per process.
    "TORCHDYNAMO_DISABLE": "1",
    # Several ranks share few cores; more threads per rank only adds contention.
    "OMP_NUM_THREADS": "1",
}

# After one rank fails, the others are usually blocked in a collective that will never
# complete; give them this long to report their own errors, then kill them.
FAILURE_GRACE_S = 2.0
POLL_INTERVAL_S = 0.05


class RankFailed(RuntimeError):
    """A rank raised. `rank`, `exc_type` (the exception's class name) and `child_traceback`
    describe the first failure seen."""

    def __init__(self, rank: int, exc_type: str, child_traceback: str):
        super().__init__(f"rank {rank} raised {exc_type}:\n{child_traceback}")
        self.rank = rank
        self.exc_type = exc_type
        self.child_traceback = child_traceback


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, args: tuple, result_path: str) -> None:
    # Own process group, so the parent can also kill what this rank starts (dist_checkpointing
    # runs a writer process).
    os.setpgrp()
    try:
        payload = pickle.dumps(("ok", fn(rank, *args)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        payload = pickle.dumps(("error", type(exc).__name__, traceback.format_exc()))
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, result_path)  # the parent never reads a half-written result


@contextlib.contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _kill(procs: List[mp.Process]) -> None:
    for p in procs:
        if p.is_alive():
            # The group is only there once the child ran os.setpgrp(); kill the child itself too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.kill()
    for p in procs:
        p.join()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> List[Any]:
    """Run `fn(rank, *args)` on `world_size` processes; return their results in rank order.

    Each process sees RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT as under torchrun, plus `CHILD_ENV`. Raises `RankFailed` if a rank raises or
    dies, and `TimeoutError` if the ranks have not all finished after `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    common_env = {
        **CHILD_ENV,
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        paths = [Path(tmp) / f"rank{r}.pkl" for r in range(world_size)]
        procs: List[mp.Process] = []
        try:
            for rank in range(world_size):
                rank_env = {**common_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                proc = ctx.Process(target=_rank_main, args=(fn, rank, args, str(paths[rank])))
                with _environment(rank_env):
                    proc.start()
                procs.append(proc)
            return _collect(procs, paths, timeout)
        finally:
            _kill(procs)


def _collect(procs: List[mp.Process], paths: List[Path], timeout: float) -> List[Any]:
    deadline = time.monotonic() + timeout
    outcomes = {}
    first_failure = None  # (rank, when): the first failure seen is usually the cause
    while len(outcomes) < len(procs):
        for rank, proc in enumerate(procs):
            if rank in outcomes or proc.is_alive():
                continue
            outcomes[rank] = _read_outcome(paths[rank], proc)
            if outcomes[rank][0] != "ok" and first_failure is None:
                first_failure = (rank, time.monotonic())
        if first_failure and time.monotonic() - first_failure[1] > FAILURE_GRACE_S:
            break
        if time.monotonic() > deadline:
            pending = [r for r in range(len(procs)) if r not in outcomes]
            raise TimeoutError(
                f"ranks {pending} of {len(procs)} still running after {timeout:.0f} s "
                "(a gloo collective that never completes looks like this)"
            )
        time.sleep(POLL_INTERVAL_S)
    if first_failure:
        rank = first_failure[0]
        _, exc_type, child_traceback = outcomes[rank]
        raise RankFailed(rank, exc_type, child_traceback)
    return [outcomes[rank][1] for rank in range(len(procs))]


def _read_outcome(path: Path, proc: mp.Process) -> tuple:
    if not path.exists():  # killed, or died in the interpreter before reporting
        return ("error", "ProcessDied", f"exited with code {proc.exitcode} and no result\n")
    with open(path, "rb") as f:
        return pickle.load(f)
