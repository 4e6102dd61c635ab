"""Host-side helpers every Triton kernel package shares (nothing here imports Triton).

  interpreting()         Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)
  triton_runs(t)         the Triton kernels run for tensors like t: Triton is installed and t is a
                         CUDA tensor, or the interpreter is on (CPU tests)
  use_triton(t, op)      triton_runs(t), logging once per (op, path, device type) which path runs
  sm_count(device)       streaming multiprocessors of a CUDA device (cached)
  ROUND_CODES            torch dtype -> the constexpr ROUND code of `round_to_code`
                         (kernels/fp8/triton_cast.py): what intermediate results are rounded to

The Triton jit helpers (FP8 scale / cast, bf16 round to nearest even, the interpreter's exact
rounding) live in kernels/fp8/triton_cast.py.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
from torch import Tensor

__all__ = ["interpreting", "triton_installed", "triton_runs", "use_triton", "log_once",
           "sm_count", "ROUND_NONE", "ROUND_BF16", "ROUND_FP16", "ROUND_CODES"]

logger = logging.getLogger(__name__)
_logged: set[tuple] = set()

# ROUND codes (constexpr): the dtype that intermediate results are rounded to (the inputs' dtype).
ROUND_NONE, ROUND_BF16, ROUND_FP16 = 0, 1, 2
ROUND_CODES = {torch.float32: ROUND_NONE, torch.bfloat16: ROUND_BF16,
               torch.float16: ROUND_FP16}


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1); read on every
    call (tests change it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs(t: Tensor) -> bool:
    """Whether the Triton kernels run for tensors on t's device: CUDA tensors, or any tensor under
    the interpreter, when Triton is installed; otherwise the PyTorch reference runs."""
    return triton_installed() and (t.is_cuda or interpreting())


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA `device` (persistent kernels size their grids by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def log_once(key: tuple, message: str, log: logging.Logger = logger) -> None:
    """log.info(message) the first time `key` is seen."""
    if key not in _logged:
        _logged.add(key)
        log.info(message)


def use_triton(t: Tensor, op: str, log: logging.Logger = logger) -> bool:
    """triton_runs(t); the first call per (op, path, device type) logs which path runs."""
    runs = triton_runs(t)
    path = "Triton kernels" if runs else "PyTorch reference"
    log_once((op, path, t.device.type), f"{op}: {path} on {t.device.type}", log)
    return runs
