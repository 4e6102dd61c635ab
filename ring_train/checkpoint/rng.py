"""Every random number generator a rank draws from, captured and restored as one object.

Restoring them makes a resumed run draw the same dropout masks, data shuffles and router
noise as the run that was never interrupted.
"""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generators and megatron-core's model-parallel tracker
    (whose states differ between tensor-parallel ranks)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states({name: s.clone() for name, s in state["tracker"].items()})
