"""Training runs for benchmarks: through the real launcher under torchrun, from shared weights.

    python benchmarks/runs.py init DIR [recipe overrides...]   (under torchrun, one process)
writes a recipe's randomly initialised weights, layout-independent, so runs at different
layouts or precisions start from the same model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, args: list, log: Path, port: int = 29511) -> None:
    """Runs `args` under torchrun with `nproc` processes, output to `log`; raises on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", *map(str, args)]
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}")


def initial_weights(directory: Path, overrides: list, log: Path) -> Path:
    """The weights of the recipe `overrides` compose to, written once into `directory`."""
    if not (directory / "latest").is_file():
        torchrun(1, [__file__, "init", directory, *overrides], log)
    return directory


def launch(nproc: int, output_dir: Path, overrides: list, log: Path, port: int = 29511) -> list:
    """`launch/pretrain.py` with `overrides`; returns the metrics.jsonl records of the run.
    Runs at the same time need different ports."""
    torchrun(nproc, ["launch/pretrain.py", f"output_dir={output_dir}", *overrides], log, port)
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(records: list) -> list:
    """The per-step training records (those with a loss), in order."""
    return [r for r in records if "loss" in r]


def median_after_warmup(values: list, warmup: int = 3) -> float:
    """Median of `values` without the first `warmup` (compilation, autotuning, allocator)."""
    rest = sorted(values[warmup:] or values)
    return rest[len(rest) // 2]


def _write_initial_weights(directory: str, overrides: list) -> None:
    from megatron.core import parallel_state

    from ring_train.checkpoint.training_checkpoint import save_weights
    from ring_train.config.hydra import compose_recipe, to_train_config
    from ring_train.model.transformer_config import to_transformer_config
    from ring_train.parallel.distributed import init_distributed
    from ring_train.testing.global_weights import fill_global_weights
    from ring_train.training.setup import build_model_chunks

    cfg = to_train_config(compose_recipe(overrides))
    init_distributed(seed=cfg.seed)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    config = to_transformer_config(cfg.model, cfg.parallel, params_dtype=dtype)
    chunks = build_model_chunks(cfg.model, config)
    fill_global_weights(chunks, std=cfg.model.init_std)
    save_weights(Path(directory), 0, chunks)
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "init":
        sys.exit(__doc__)
    _write_initial_weights(sys.argv[2], sys.argv[3:])
