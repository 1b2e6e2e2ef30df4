"""Cooperative interruption of long computations at their stage boundaries.

The server runs an Adapt or Classify inside :func:`interruptible` with a check that raises once the
client has gone (cancelled, or past its deadline). Long loops call :func:`checkpoint` between stages
(each inner-loop step, each backbone chunk), so an abandoned call stops there and frees its worker.
Outside :func:`interruptible` (training, ``fewshot eval``) a checkpoint costs one attribute lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def checkpoint(stage: str) -> None:
    """Call this thread's check (if any) with the name of the stage about to start."""
    check = getattr(_local, "check", None)
    if check is not None:
        check(stage)


def active() -> bool:
    """Whether a check is installed on this thread (callers may then split work into stages)."""
    return getattr(_local, "check", None) is not None


@contextmanager
def interruptible(check: Callable[[str], None]) -> Iterator[None]:
    """Install ``check(stage)`` for this thread while the block runs (it raises to interrupt)."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous
