"""SIGTERM / SIGUSR1 (SLURM preemption, job end): save at the next step boundary and exit.

Ranks may get the signal at different moments, so the decision to stop is all-reduced at the
step boundary: every rank saves the same step and exits together with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later" — a wrapper or SLURM requeue resumes from the saved step.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class PreemptionWatch:
    def __init__(self):
        self._received = False
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self._received = True

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (a collective: call on all ranks)."""
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        flag = torch.tensor([1.0 if self._received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
