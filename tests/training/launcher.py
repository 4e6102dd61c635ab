"""Starts `launch/pretrain.py` as a job of N processes, as torchrun or srun would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

from ring_train.testing.multiprocess import free_port

ROOT = Path(__file__).resolve().parents[2]


def start(overrides: List[str], world_size: int) -> List[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "pretrain.py"), *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return procs


def wait(procs: List[subprocess.Popen], timeout: float = 300) -> List[int]:
    codes = []
    for proc in procs:
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        codes.append(proc.returncode)
    return codes


def run(overrides: List[str], world_size: int = 2, timeout: float = 300) -> tuple[List[int], str]:
    procs = start(overrides, world_size)
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        outputs.append(out)
    return [p.returncode for p in procs], outputs[0]


def metrics(output_dir: Path) -> List[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def terminate_when(procs: List[subprocess.Popen], output_dir: Path, stage: str, stage_step: int,
                   timeout: float = 300) -> None:
    """SIGTERM every process (as SLURM preemption does) once `stage` logged `stage_step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("stage") == stage and r.get("stage_step", -1) >= stage_step
               for r in metrics(output_dir)):
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("the job ended before it could be preempted")
        time.sleep(0.1)
    raise TimeoutError(f"{stage} step {stage_step} never logged")
