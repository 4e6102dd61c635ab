#!/usr/bin/env bash
# Sets up .venv and runs the CPU test suite (GPU tests are marked `gpu` and skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest tests "$@"
