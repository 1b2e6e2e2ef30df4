"""What one call may still spend, checked at every stage boundary of its work.

The service creates a :class:`CallBudget` per Adapt or Classify: the decoded-pixel budget of the call,
the inner-loop work (support images x steps), and whether the call is still wanted (the client's
deadline, or a cancellation the event loop saw). Workers call :meth:`CallBudget.check` between stages
(each image decoded, each backbone batch, each inner step), so the work of an abandoned call stops at
the next boundary and frees its worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from fewshot.server.errors import CallAbandoned, TooLarge


@dataclass
class CallBudget:
    """``max_pixels``: decoded pixels (width x height, summed over the call's images); ``deadline``:
    ``time.monotonic()`` after which the client no longer waits (``None``: no deadline)."""

    max_pixels: int = 1 << 62
    deadline: float | None = None
    pixels: int = 0
    abandoned: threading.Event = field(default_factory=threading.Event)
    #: Called with the stage at which the work of an abandoned call stopped (metrics).
    on_stop: Callable[[str], None] = lambda stage: None

    @staticmethod
    def for_call(max_pixels: int, time_remaining: float | None,
                 on_stop: Callable[[str], None] = lambda stage: None) -> "CallBudget":
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        return CallBudget(max_pixels, deadline, on_stop=on_stop)

    def abandon(self) -> None:
        """The client went away (cancellation seen by the event loop): stop at the next boundary."""
        self.abandoned.set()

    def check(self, stage: str) -> None:
        """Raise :class:`CallAbandoned` if the call was cancelled or its deadline passed."""
        if self.abandoned.is_set():
            self.on_stop(stage)
            raise CallAbandoned(f"the call was cancelled; its work stopped before {stage}")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.abandoned.set()
            self.on_stop(stage)
            raise CallAbandoned(f"the call's deadline passed; its work stopped before {stage}")

    def charge_pixels(self, pixels: int) -> None:
        """Account ``pixels`` about to be decoded (:class:`TooLarge` past the call's budget)."""
        self.pixels += pixels
        if self.pixels > self.max_pixels:
            raise TooLarge(f"the call's images hold more than {self.max_pixels} decoded pixels (width x height "
                           f"summed; {self.pixels} so far); send fewer or smaller images per call")
