"""Merging concurrent Classify requests into one backbone (or adapted-network) call.

Requests that share a key (the model, for metric heads; the task, for inner-loop networks whose
weights are per task) and arrive within ``max_delay`` are concatenated along the batch axis, run
once, and split back. Only batch-invariant computations are merged: per-image backbone features and
the support-BatchNorm network; transductive heads (LaplacianShot) then run on exactly one request's
features, never across requests.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch


@dataclass
class _Pending:
    run: Callable[[torch.Tensor], torch.Tensor]
    inputs: list[torch.Tensor] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """``await batcher.submit(key, images, run)`` returns ``run(images)`` computed in a merged batch.

    Args:
        executor: where ``run`` executes (off the event loop).
        max_delay: seconds the first request of a batch waits for others (0: merge only what is
            already queued).
        max_batch: images per call; a batch is flushed as soon as it reaches this size.
    """

    def __init__(self, executor: Executor, max_delay: float = 0.002, max_batch: int = 256,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.executor, self.max_delay, self.max_batch = executor, max_delay, max_batch
        self.on_batch = on_batch or (lambda _: None)
        self._pending: dict[Hashable, _Pending] = {}

    async def submit(self, key: Hashable, images: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if len(images) >= self.max_batch:
            self.on_batch(len(images))
            return await loop.run_in_executor(self.executor, run, images)
        pending = self._pending.get(key)
        if pending is not None and pending.size + len(images) > self.max_batch:
            self._flush(key)
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending(run)
            pending.timer = loop.call_later(self.max_delay, self._flush, key)
        future = loop.create_future()
        pending.inputs.append(images)
        pending.futures.append(future)
        pending.size += len(images)
        if pending.size >= self.max_batch:
            self._flush(key)
        return await future

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
        inputs = [x for x, keep in zip(pending.inputs, live) if keep]
        futures = [f for f, keep in zip(pending.futures, live) if keep]
        try:
            merged = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
            self.on_batch(len(merged))
            out = await asyncio.get_running_loop().run_in_executor(self.executor, pending.run, merged)
        except Exception as exc:  # every waiter gets the error (e.g. a backend that went away)
            for f in futures:
                if not f.done():
                    f.set_exception(exc)
            return
        start = 0
        for x, f in zip(inputs, futures):
            if not f.done():
                f.set_result(out[start:start + len(x)])
            start += len(x)
