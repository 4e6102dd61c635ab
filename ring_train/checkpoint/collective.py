"""Collectives that keep the ranks in step while saving and loading.

A rank that raised alone would leave the others blocked in the next collective, so every check
ends in an exchange: all ranks learn the first failure and raise the same CheckpointError. In a
process without a process group (a tool, a test), or inside `alone()` (one rank working on its
own, e.g. a WSM merge while the others wait), each helper is the one-process case.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch.distributed as dist

from ring_train.checkpoint.errors import CheckpointError

T = TypeVar("T")
_local = threading.local()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within this block the helpers act as if this process were the whole job."""
    previous = getattr(_local, "alone", False)
    _local.alone = True
    try:
        yield
    finally:
        _local.alone = previous


def _distributed() -> bool:
    return not getattr(_local, "alone", False) and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def my_share(items: Sequence[T]) -> List[T]:
    """This rank's items when `items` (the same list on every rank) is dealt out round robin."""
    return list(items[rank() :: world_size()])


def all_gather(value: Any) -> List[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not _distributed():
        return [value]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def raise_first_error(error: Optional[str]) -> None:
    """Collective: raise CheckpointError on every rank if any rank passes an error message
    (the lowest such rank's), return on every rank otherwise."""
    errors = [e for e in all_gather(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])


def on_rank0(fn: Callable[[], T]) -> T:
    """Collective: run `fn` on rank 0 only and return its result on every rank; if it raised,
    every rank raises CheckpointError with its message (chained to the original on rank 0)."""
    result, error, cause = None, None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of any failure
            error, cause = f"{type(exc).__name__}: {exc}", exc
    outcome = [result, error]
    if _distributed():
        dist.broadcast_object_list(outcome, src=0)
    result, error = outcome
    if error is not None:
        raise CheckpointError(f"on rank 0: {error}") from cause
    return result
