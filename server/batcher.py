"""Merging concurrent Classify requests into one backbone (or adapted-network) call.

Requests that share a key (the model, for metric heads; the task, for inner-loop networks whose
weights are per task) are concatenated along the batch axis, run once, and split back. Continuous
batching: a request whose key has nothing running starts at once (no wait at low load); requests that
arrive while a call of their key runs are queued, and the queue starts when that call ends, after
``max_delay``, or when it holds ``max_batch`` images, whichever comes first. Only batch-invariant computations are merged: per-image backbone features and
the support-BatchNorm network; transductive heads (LaplacianShot) then run on exactly one request's
features, never across requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from fewshot.models.plan import finish_each

Fn = Callable[[torch.Tensor], torch.Tensor]
#: Runs a batch of requests' items at once -> one result (or the exception it raised) per item.
RunMany = Callable[[list[Any]], list[Any]]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def concatenated(run: Fn) -> RunMany:
    """``run`` over the concatenation of ``(images, finish)`` items, then each item's ``finish`` on
    its own rows (a ``finish`` that raises fails its own item only)."""

    def run_many(items: list[tuple[torch.Tensor, Fn]]) -> list[Any]:
        inputs = [x for x, _ in items]
        out = run(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
        return finish_each(list(out.split([len(x) for x in inputs])), [finish for _, finish in items])

    return run_many


@dataclass
class _Pending:
    key: Hashable
    run_many: RunMany
    items: list[Any] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """``await batcher.submit(key, images, run, finish)`` returns ``finish(run(images))``, ``run``
    computed in a merged batch, then each request's ``finish`` on its own rows in the same worker call
    (one executor hop per batch, not one more per request); a ``finish`` that raises fails its own
    request only. ``submit_many(key, item, size, run_many)`` is the general form: ``run_many`` gets
    the items of every request queued under ``key`` (e.g. different tasks' weights, stacked).

    Args:
        executor: where ``run`` executes (off the event loop).
        max_delay: the longest a queued request waits for the running call of its key to end.
        max_batch: images per call; a batch is flushed as soon as it reaches this size.
        on_batch: called with each merged call's size; ``on_wait`` with how long it waited for a worker thread.
    """

    def __init__(
        self,
        executor: Executor,
        max_delay: float = 0.002,
        max_batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.executor, self.max_delay, self.max_batch = executor, max_delay, max_batch
        self.on_batch = on_batch or (lambda _: None)
        self.on_wait = on_wait or (lambda _: None)
        self._pending: dict[Hashable, _Pending] = {}
        self._running: dict[Hashable, int] = {}  # calls of each key now in the executor
        self._direct: dict[Hashable, int] = {}  # calls of each key run by run_if_idle (worker threads)
        self._lock = threading.Lock()  # guards _direct
        self._loop: asyncio.AbstractEventLoop | None = None

    def run_if_idle(self, key: Hashable, size: int, work: Callable[[], Any]) -> tuple[bool, Any]:
        """From a worker thread: ``(True, work())`` at once when nothing of ``key`` runs or waits (the
        request then costs one executor hop, not two: there is nothing to merge it with), else
        ``(False, None)`` and the caller submits. Requests that arrive meanwhile queue behind it."""
        with self._lock:
            if key in self._pending or self._running.get(key) or self._direct.get(key):
                return False, None
            self._direct[key] = 1
        try:
            self.on_batch(size)
            return True, work()
        finally:
            with self._lock:
                del self._direct[key]
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._start_if_idle, key)

    def _start_if_idle(self, key: Hashable) -> None:
        if key in self._pending and not self._running.get(key) and not self._direct.get(key):
            self._flush(key)

    async def submit(self, key: Hashable, images: torch.Tensor, run: Fn, finish: Fn | None = None) -> torch.Tensor:
        return await self.submit_many(key, (images, finish or _identity), len(images), concatenated(run))

    async def submit_many(self, key: Hashable, item: Any, size: int, run_many: RunMany) -> Any:
        """``run_many([item, ...])``'s result for ``item``, run with the items queued under ``key``
        (``run_many`` of the first request of a batch runs them all); ``size`` counts towards ``max_batch``."""
        loop = self._loop = asyncio.get_running_loop()
        pending = self._pending.get(key)
        if size >= self.max_batch or (pending is None and not self._running.get(key) and not self._direct.get(key)):
            self.on_batch(size)
            return _unwrap((await self._execute(key, lambda: run_many([item])))[0])
        if pending is not None and pending.size + size > self.max_batch:
            self._flush(key)
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending(key, run_many)
            pending.timer = loop.call_later(self.max_delay, self._flush, key)
        future = loop.create_future()
        pending.items.append(item)
        pending.futures.append(future)
        pending.size += size
        if pending.size >= self.max_batch:
            self._flush(key)
        return await future

    async def _execute(self, key: Hashable, work: Callable[[], Any]) -> Any:
        """``work()`` in the executor, counted as running for ``key``; when the last running call of
        ``key`` ends, its queue starts."""
        self._running[key] = self._running.get(key, 0) + 1
        submitted = time.perf_counter()

        def timed() -> Any:
            self.on_wait(time.perf_counter() - submitted)
            return work()

        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, timed)
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
                self._start_if_idle(key)

    def _flush(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        asyncio.get_running_loop().create_task(self._run(pending))

    async def _run(self, pending: _Pending) -> None:
        live = [not f.cancelled() for f in pending.futures]
        if not any(live):
            return
        items = [x for x, keep in zip(pending.items, live) if keep]
        futures = [f for f, keep in zip(pending.futures, live) if keep]
        try:
            self.on_batch(pending.size)
            results = await self._execute(pending.key, lambda: pending.run_many(items))
        except Exception as exc:  # every waiter gets the error (e.g. a backend that went away)
            for f in futures:
                if not f.done():
                    f.set_exception(exc)
            return
        for f, result in zip(futures, results):
            if not f.done():
                if isinstance(result, Exception):
                    f.set_exception(result)
                else:
                    f.set_result(result)


def _unwrap(result: Any) -> Any:
    if isinstance(result, Exception):
        raise result
    return result
