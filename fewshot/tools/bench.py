"""``fewshot bench --target HOST:PORT``: service latency and throughput, measured through the client SDK.

For each served model and method, and each concurrency level: ``requests`` Adapt calls on real test
tasks (5-way, ``shots``-shot, PNG bytes), then ``requests`` Classify calls of ``queries`` per class
against those tasks, from ``concurrency`` client threads. Reports p50/p90/p99 latency of each RPC and
Classify throughput in images/s (query images over the wall time of the Classify phase).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.zoo import load_model
from fewshot.tools.demo import EncodedTask, encode_episode


def percentiles(ms: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, 1e3 * (time.perf_counter() - start)


def bench_service(target: str, models: list[str] | None = None, concurrency: tuple[int, ...] = (1, 8),
                  requests: int = 64, shots: int = 5, queries: int = 15, warmup: int = 4, seed: int = 0,
                  token: str | None = None) -> list[dict]:
    """One row per (model, method, concurrency)."""
    from fewshot_client import FewShotClient

    rows = []
    with FewShotClient(target, token=token, timeout=300.0) as client:
        infos = client.models()
        for info in infos:
            if models and info.name not in models:
                continue
            data = load_dataset(load_model(info.name).card.dataset, "test")
            ways = max(info.min_ways, min(5, info.max_ways))
            sampler = EpisodeSampler(data, ways, shots, queries, seed)
            episodes = [encode_episode(data, sampler.episode(i)) for i in range(requests + warmup)]
            for method in info.methods:
                for c in concurrency:
                    rows.append(_bench_one(client, info.name, method, episodes, warmup, c, ways, shots))
    return rows


def _bench_one(client, model: str, method: str, episodes: list[EncodedTask], warmup: int, concurrency: int,
               ways: int, shots: int) -> dict:
    def adapt(t: EncodedTask):
        return _timed(client.adapt, t.support, t.support_labels, model=model, method=method)

    for t in episodes[:warmup]:
        task, _ = adapt(t)
        task.classify(t.queries)
        task.delete()
    work = episodes[warmup:]
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        adapted = list(pool.map(adapt, work))
        adapt_wall = time.perf_counter() - start
        start = time.perf_counter()
        classified = list(pool.map(lambda pair: _timed(pair[0][0].classify, pair[1].queries), zip(adapted, work)))
        classify_wall = time.perf_counter() - start
        list(pool.map(lambda a: a[0].delete(), adapted))
    images = sum(len(t.queries) for t in work)
    return {"model": model, "method": method, "ways": ways, "shots": shots, "queries_per_call": len(work[0].queries),
            "concurrency": concurrency, "requests": len(work), "adapt": percentiles([ms for _, ms in adapted]),
            "adapt_per_s": round(len(work) / adapt_wall, 1), "classify": percentiles([ms for _, ms in classified]),
            "classify_images_per_s": round(images / classify_wall, 1)}


def describe(row: dict) -> str:
    a, c = row["adapt"], row["classify"]
    return (f"{row['model']:37s} {row['method']:13s} c={row['concurrency']:<2d} Adapt ({row['ways']}x{row['shots']}) "
            f"p50/p90/p99 {a['p50_ms']:.1f}/{a['p90_ms']:.1f}/{a['p99_ms']:.1f} ms | Classify ({row['queries_per_call']} images) "
            f"p50/p90/p99 {c['p50_ms']:.1f}/{c['p90_ms']:.1f}/{c['p99_ms']:.1f} ms, {row['classify_images_per_s']:.0f} images/s")
