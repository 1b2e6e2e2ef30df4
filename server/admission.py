"""Admission control: at most ``capacity`` heavy calls (Adapt, Classify) run, at most ``max_queue`` wait.

A call past both is refused at once with RESOURCE_EXHAUSTED (:class:`Overloaded`: nothing was done,
retry after a short back-off) instead of joining an unbounded queue. A waiting call whose client
cancels or whose deadline passes leaves the queue. ``on_saturated(True)`` is called when the queue
fills and ``on_saturated(False)`` once it has drained to half (the readiness signal of the health
service); ``on_change(running, waiting)`` feeds the Prometheus gauges and ``on_wait(seconds)`` the histogram of
how long each admitted call waited for its slot (0 for one admitted at once).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fewshot.server.errors import Overloaded


class Admission:
    """Bounded concurrency with a bounded FIFO queue (single event loop)."""

    def __init__(
        self,
        capacity: int,
        max_queue: int,
        on_change: Callable[[int, int], None] | None = None,
        on_saturated: Callable[[bool], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if capacity < 1 or max_queue < 0:
            raise ValueError("admission needs capacity >= 1 and max_queue >= 0")
        self.capacity, self.max_queue = capacity, max_queue
        self.running = 0
        self._waiting: deque[asyncio.Future] = deque()
        self._on_change = on_change or (lambda running, waiting: None)
        self._on_saturated = on_saturated or (lambda saturated: None)
        self._on_wait = on_wait or (lambda seconds: None)
        self.saturated = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the block (:class:`Overloaded` when the queue is full)."""
        arrived = time.perf_counter()
        if self.running < self.capacity and not self._waiting:
            self.running += 1
        elif len(self._waiting) >= self.max_queue:
            self._set_saturated(True)
            raise Overloaded(
                f"the server is at capacity ({self.running} calls running, {len(self._waiting)} queued); "
                "nothing was done: retry after a short back-off"
            )
        else:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            if len(self._waiting) >= self.max_queue:
                self._set_saturated(True)
            self._changed()
            try:
                await future  # the releasing call hands its slot over (running stays the same)
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # the slot was handed over just as we were cancelled: pass it on
                else:
                    self._remove(future)
                raise
        self._on_wait(time.perf_counter() - arrived)
        self._changed()
        try:
            yield
        finally:
            self._release()

    def _remove(self, future: asyncio.Future) -> None:
        try:
            self._waiting.remove(future)
        except ValueError:
            pass
        self._changed()

    def _release(self) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                self._changed()
                return
        self.running -= 1
        self._changed()

    def _changed(self) -> None:
        if self.saturated and len(self._waiting) <= self.max_queue // 2:
            self._set_saturated(False)
        self._on_change(self.running, len(self._waiting))

    def _set_saturated(self, saturated: bool) -> None:
        if saturated != self.saturated:
            self.saturated = saturated
            self._on_saturated(saturated)
