"""The batcher's continuous batching: an idle key runs at once, requests that arrive while their key
runs merge into the next call, every request gets exactly its own rows back."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fewshot.server.batcher import Batcher

pytestmark = pytest.mark.unit


def test_an_idle_key_runs_at_once_and_arrivals_during_a_call_merge_into_the_next():
    calls: list[int] = []
    release = threading.Event()

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if len(calls) == 1:
            release.wait(5)  # the first call holds the engine while others arrive
        return x * 2

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            batcher = Batcher(pool, max_delay=30.0, max_batch=64)  # a timer that never fires in this test
            loop = asyncio.get_running_loop()
            start = loop.time()
            first = asyncio.ensure_future(batcher.submit("m", torch.full((1, 2), 1.0), run))
            while not calls:
                await asyncio.sleep(0.001)
            assert loop.time() - start < 5  # not held back by max_delay
            rest = [asyncio.ensure_future(batcher.submit("m", torch.full((n, 2), float(n)), run)) for n in (2, 3, 4)]
            other_key = await batcher.submit("other", torch.ones(1, 2), run)  # another key does not wait
            await asyncio.sleep(0.05)
            release.set()
            results = await asyncio.gather(first, *rest)
            assert torch.equal(other_key, torch.full((1, 2), 2.0))
            for n, out in zip((1, 2, 3, 4), results):
                assert torch.equal(out, torch.full((n, 2), 2.0 * n))
        assert calls == [1, 1, 9]  # first alone, the other key alone, then the three queued ones merged

    asyncio.run(main())


def test_a_full_queue_starts_without_waiting_and_a_failure_reaches_every_waiter():
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(pool, max_delay=30.0, max_batch=4)
            gate = threading.Event()
            blocker = asyncio.ensure_future(batcher.submit("k", torch.zeros(1, 1), lambda x: (gate.wait(5), x)[1]))
            await asyncio.sleep(0.05)

            def boom(x: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("backend went away")

            waiters = [asyncio.ensure_future(batcher.submit("k", torch.zeros(2, 1), boom)) for _ in range(2)]
            done, _ = await asyncio.wait(waiters, timeout=5)  # 4 images: the queue is full, it starts at once
            assert len(done) == 2 and all(isinstance(w.exception(), RuntimeError) for w in waiters)
            gate.set()
            assert torch.equal(await blocker, torch.zeros(1, 1))

    asyncio.run(main())


def test_each_request_finishes_its_own_rows_and_a_failing_finish_fails_only_its_request():
    gate = threading.Event()

    def run(x: torch.Tensor) -> torch.Tensor:
        gate.wait(5)
        return x + 1

    def bad(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("this head failed")

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(pool, max_delay=30.0, max_batch=64)
            first = asyncio.ensure_future(batcher.submit("k", torch.zeros(1, 1), run, lambda y: y * 10))
            await asyncio.sleep(0.05)
            ok = asyncio.ensure_future(batcher.submit("k", torch.ones(2, 1), run, lambda y: y.sum(0, keepdim=True)))
            failing = asyncio.ensure_future(batcher.submit("k", torch.ones(1, 1), run, bad))
            await asyncio.sleep(0.05)
            gate.set()
            assert torch.equal(await first, torch.full((1, 1), 10.0))
            assert torch.equal(await ok, torch.full((1, 1), 4.0))
            with pytest.raises(ValueError, match="this head failed"):
                await failing

    asyncio.run(main())


def test_an_idle_key_runs_in_the_callers_thread_and_arrivals_meanwhile_queue_behind_it():
    """``run_if_idle``: the request that finds its key idle runs in its own worker call (one hop);
    while it runs, the key is busy: another direct attempt is refused and submitted requests queue and
    start when it ends (not at the 30 s timer)."""
    calls: list[int] = []
    inside, release = threading.Event(), threading.Event()

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x + 1

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            batcher = Batcher(pool, max_delay=30.0, max_batch=64)
            loop = asyncio.get_running_loop()
            await batcher.submit("k", torch.zeros(1, 1), run)  # the batcher knows its loop

            def direct() -> tuple[bool, object]:
                return batcher.run_if_idle("k", 2, lambda: (inside.set(), release.wait(5), run(torch.zeros(2, 1)))[2])

            first = loop.run_in_executor(pool, direct)
            await loop.run_in_executor(None, inside.wait, 5)
            assert batcher.run_if_idle("k", 1, lambda: run(torch.zeros(1, 1))) == (False, None)  # busy
            queued = [asyncio.ensure_future(batcher.submit("k", torch.full((n, 1), float(n)), run)) for n in (3, 4)]
            await asyncio.sleep(0.05)
            assert calls == [1]  # the queued ones wait for the direct call
            release.set()
            ran, out = await first
            assert ran and torch.equal(out, torch.ones(2, 1))
            results = await asyncio.wait_for(asyncio.gather(*queued), 5)
            assert [r.tolist() for r in results] == [[[4.0]] * 3, [[5.0]] * 4]
        assert calls == [1, 2, 7]  # the direct call, then the two queued requests merged

    asyncio.run(main())
