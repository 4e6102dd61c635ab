#!/usr/bin/env bash
# Sets up .venv and runs the tiny recipe on 2 CPU processes (or GPUs): three stages shaped like
# 4K / 32K / 128K on the built-in corpus, each ending in a WSM merge. Extra arguments are Hydra
# overrides, e.g. scripts/tiny.sh output_dir=runs/tiny2
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1
exec .venv/bin/torchrun --nproc_per_node=2 launch/pretrain.py recipe=tiny "$@"
