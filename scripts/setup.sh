#!/usr/bin/env bash
# Creates .venv (or reuses it) and installs ring-train with the given extras (default: dev).
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so that no
# dependency can pull the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q torch
  else
    $py -m pip install -q torch==2.13.0
  fi
fi
$py -m pip install -q -e ".[${extras}]"
$py -c "import torch, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
