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
from collections.abc import Callable
from dataclasses import dataclass, field

from fewshot.server.errors import CallAbandoned, Overloaded, TooLarge


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
    def for_call(max_pixels: int, time_remaining: float | None, on_stop: Callable[[str], None] = lambda stage: None) -> CallBudget:
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
            raise TooLarge(
                f"the call's images hold more than {self.max_pixels} decoded pixels (width x height "
                f"summed; {self.pixels} so far); send fewer or smaller images per call"
            )


class BodyBudget:
    """Bytes of request bodies that calls in flight hold, all calls of the process together (issue 34).

    Each call charges its body as it arrives (a unary message once received, each AdaptStream chunk and
    each HTTP body chunk before it is kept) and gives it all back when the call ends. A charge past
    ``limit`` is refused at once (:class:`~fewshot.server.errors.Overloaded`, RESOURCE_EXHAUSTED / 429): nothing
    was done, the client retries after a back-off. With ``--max-request-mb`` bounding one call, this bounds
    all of them together, so clients cannot make the process hold more than ``limit`` of bodies at once."""

    def __init__(self, limit: int, flag: str = "--max-inflight-body-mb", on_release: Callable[[int], None] = lambda size: None) -> None:
        """``on_release``: called with what a call held once it gave it back (the allocator's trim)."""
        self.limit, self.flag, self.on_release = limit, flag, on_release
        self.held = 0
        self._lock = threading.Lock()

    def charge(self, size: int) -> None:
        with self._lock:
            if self.held + size > self.limit:
                held = self.held
            else:
                self.held += size
                return
        raise Overloaded(
            f"the server's budget for request bodies in flight is used up ({held >> 20} of "
            f"{self.limit >> 20} MB held by calls now running, {self.flag}); nothing was done: retry "
            "after a short back-off, or send fewer images per call"
        )

    def release(self, size: int) -> None:
        with self._lock:
            self.held -= size
        self.on_release(size)

    def hold(self) -> BodyHold:
        """A call's share: charge it as bytes arrive, release it all once (``with`` or :meth:`BodyHold.close`)."""
        return BodyHold(self)


class BodyHold:
    """What one call holds of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.size = budget, 0

    def charge(self, size: int) -> None:
        self.budget.charge(size)
        self.size += size

    def close(self) -> None:
        size, self.size = self.size, 0
        if size:
            self.budget.release(size)

    def __enter__(self) -> BodyHold:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
