"""A tensor counter on stderr for long conversions, redrawn in place on one line."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`step(nbytes)` after each tensor; `close()` ends the line. Silent unless `enabled`."""

    REDRAW_S = 0.5  # a log file gets a line per redraw, not one per tensor

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO = sys.stderr):
        self.label, self.total, self.enabled, self.stream = label, total, enabled, stream
        self.done = 0
        self.bytes = 0
        self._start = self._drawn = time.monotonic()

    def step(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= self.REDRAW_S or self.done == self.total):
            self._drawn = now
            elapsed = max(now - self._start, 1e-9)
            self.stream.write(
                f"\r{self.label}: {self.done}/{self.total} tensors, {self.bytes / 2**30:.2f} GiB, "
                f"{self.bytes / 2**20 / elapsed:.0f} MiB/s"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()
