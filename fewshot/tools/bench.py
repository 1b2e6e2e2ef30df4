"""``fewshot bench``: Adapt and Classify latency, in three modes (:func:`run_bench` picks one from the
subcommand's arguments and prints one line, or one JSON object, per row).

**In process** (``--model M``, :func:`bench_in_process`): one shipped model's Adapt and Classify on seeded
test tasks (``ways``-way, ``shots``-shot, ``queries`` per class), called on normalised tensors in this
process through its family's adapter (the object the server builds), no transport; median, p10 and p90.

**A running server** (``--target HOST:PORT``, :func:`bench_service`): for each served model and method,
and each concurrency level: ``requests`` Adapt calls on real test tasks (5-way, ``shots``-shot, PNG
bytes), then ``requests`` Classify calls of ``queries`` per class against those tasks, from
``concurrency`` client threads. Reports p50/p90/p99 latency of each RPC and Classify throughput in
images/s (query images over the wall time of the Classify phase).

**What the report and explanations cost** (``--target HOST:PORT --options``, :func:`bench_options`): Adapt
without and with the support-set report, Classify without and with ``explain``, side by side on the same tasks.

**The served path against its own engine** (``--compare``): :mod:`fewshot.tools.compare`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.errors import ConfigError
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


def bench_service(
    target: str,
    models: list[str] | None = None,
    concurrency: tuple[int, ...] = (1, 8),
    requests: int = 64,
    shots: int = 5,
    queries: int = 15,
    warmup: int = 4,
    seed: int = 0,
    token: str | None = None,
) -> list[dict]:
    """One row per (model, method, concurrency)."""
    from fewshot_client import FewShotClient

    rows = []
    with FewShotClient(target, token=token, timeout=300.0) as client:
        for info, ways, episodes in _served_episodes(client, models, requests + warmup, shots, queries, seed):
            for method in info.methods:
                for c in concurrency:
                    rows.append(_bench_one(client, info.name, method, episodes, warmup, c, ways, shots))
    return rows


def _served_episodes(
    client: Any, models: list[str] | None, count: int, shots: int, queries: int, seed: int
) -> Iterator[tuple[Any, int, list[EncodedTask]]]:
    """``(ModelInfo, ways, count encoded test tasks)`` for each model the server serves (``models``: only these):
    5-way where the model allows it, else its nearest number of ways."""
    for info in client.models():
        if models and info.name not in models:
            continue
        data = load_dataset(load_model(info.name).card.dataset, "test")
        ways = max(info.min_ways, min(5, info.max_ways))
        sampler = EpisodeSampler(data, ways, shots, queries, seed)
        yield info, ways, [encode_episode(data, sampler.episode(i)) for i in range(count)]


def _bench_one(client, model: str, method: str, episodes: list[EncodedTask], warmup: int, concurrency: int, ways: int, shots: int) -> dict:
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
    return {
        "model": model,
        "method": method,
        "ways": ways,
        "shots": shots,
        "queries_per_call": len(work[0].queries),
        "concurrency": concurrency,
        "requests": len(work),
        "adapt": percentiles([ms for _, ms in adapted]),
        "adapt_per_s": round(len(work) / adapt_wall, 1),
        "classify": percentiles([ms for _, ms in classified]),
        "classify_images_per_s": round(images / classify_wall, 1),
    }


def bench_options(
    target: str,
    models: list[str] | None = None,
    requests: int = 32,
    shots: int = 5,
    queries: int = 15,
    warmup: int = 4,
    seed: int = 0,
    token: str | None = None,
    explain: int = 3,
) -> list[dict]:
    """What the support-set report costs Adapt and explanations cost Classify, side by side on one server: per
    model and method, on each of ``requests`` real tasks, Adapt without and with ``report`` (the order alternating
    task by task, so drift hits both), then Classify of its queries without and with ``explain`` against the
    task adapted with the report (alternating too). One client thread; p50 and spread of each, and the ratios."""
    from fewshot_client import FewShotClient

    rows = []
    with FewShotClient(target, token=token, timeout=300.0) as client:
        for info, ways, episodes in _served_episodes(client, models, requests + warmup, shots, queries, seed):
            for method in info.methods:
                times: dict[str, list[float]] = {"adapt": [], "adapt_report": [], "classify": [], "classify_explain": []}
                for i, t in enumerate(episodes):
                    plain = lambda: _timed(client.adapt, t.support, t.support_labels, model=info.name, method=method)  # noqa: E731
                    reported = lambda: _timed(client.adapt, t.support, t.support_labels, model=info.name, method=method, report=True)  # noqa: E731
                    (a, ms_a), (b, ms_b) = (plain(), reported()) if i % 2 == 0 else reversed((reported(), plain()))
                    (_, ms_c), (_, ms_d) = (
                        (_timed(b.classify, t.queries), _timed(b.classify, t.queries, explain=explain))
                        if i % 2 == 0
                        else reversed((_timed(b.classify, t.queries, explain=explain), _timed(b.classify, t.queries)))
                    )
                    a.delete()
                    b.delete()
                    if i >= warmup:
                        for key, ms in zip(times, (ms_a, ms_b, ms_c, ms_d)):
                            times[key].append(ms)
                p50 = {k: float(np.median(v)) for k, v in times.items()}
                rows.append(
                    {
                        "model": info.name,
                        "method": method,
                        "ways": ways,
                        "shots": shots,
                        "queries_per_call": ways * queries,
                        "explain": explain,
                        "requests": requests,
                        **{k: _spread(v) for k, v in times.items()},
                        "report_over_plain": round(p50["adapt_report"] / p50["adapt"], 2),
                        "explain_over_plain": round(p50["classify_explain"] / p50["classify"], 2),
                    }
                )
    return rows


def describe_options(row: dict) -> str:
    ms = lambda key: f"{row[key]['median_ms']:.1f} ms ({row[key]['p10_ms']:.0f}-{row[key]['p90_ms']:.0f})"  # noqa: E731
    return (
        f"{row['model']:37s} {row['method']:13s} Adapt ({row['ways']}x{row['shots']}) p50 {ms('adapt')}, with report "
        f"{ms('adapt_report')}: {row['report_over_plain']:.2f}x | Classify ({row['queries_per_call']} images) p50 "
        f"{ms('classify')}, with explain={row['explain']} {ms('classify_explain')}: {row['explain_over_plain']:.2f}x"
    )


def describe_service(row: dict) -> str:
    a, c = row["adapt"], row["classify"]
    return (
        f"{row['model']:37s} {row['method']:13s} c={row['concurrency']:<2d} Adapt ({row['ways']}x{row['shots']}) "
        f"p50/p90/p99 {a['p50_ms']:.1f}/{a['p90_ms']:.1f}/{a['p99_ms']:.1f} ms | Classify ({row['queries_per_call']} images) "
        f"p50/p90/p99 {c['p50_ms']:.1f}/{c['p90_ms']:.1f}/{c['p99_ms']:.1f} ms, {row['classify_images_per_s']:.0f} images/s"
    )


def _spread(ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(float(np.median(ms)), 2),
        "p10_ms": round(float(np.percentile(ms, 10)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
    }


def bench_in_process(
    model_name: str,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    repeats: int = 20,
    warmup: int = 3,
    head: str | None = None,
    device: str = "auto",
    threads: int = 0,
    seed: int = 0,
) -> dict:
    """One row: ``repeats`` timed tasks (after ``warmup`` untimed ones) of the model's ``head`` (default:
    its own method), the backbone in ONNX Runtime; ``threads`` > 0 sets torch's thread count."""
    from fewshot.models.family import open_shipped
    from fewshot.models.runtime import torch_device

    if threads:
        torch.set_num_threads(threads)
    shipped = load_model(model_name)
    model = open_shipped(shipped, "onnxruntime", device)
    method = model.resolve_method(head)
    adapter = model.adapter(method, shots=shots)
    what = f"{method} ({', '.join(f'{k} {v}' for k, v in model.describe(adapter).items())})"
    data = load_dataset(shipped.card.dataset, "test", spec=shipped.spec)
    sampler = EpisodeSampler(data, ways, shots, queries, seed)
    norm = model.spec.normalize
    adapt_ms, classify_ms = [], []
    for i in range(warmup + repeats):
        ep = sampler.episode(i)
        xs, ys, xq = norm(data.images[ep.support]), torch.as_tensor(ep.support_labels), norm(data.images[ep.query])
        t0 = time.perf_counter()
        state = adapter.adapt(xs, ys)
        t1 = time.perf_counter()
        state.classify(xq)
        t2 = time.perf_counter()
        if i >= warmup:
            adapt_ms.append(1e3 * (t1 - t0))
            classify_ms.append(1e3 * (t2 - t1))
    return {
        "model": model.name,
        "what": what,
        "ways": ways,
        "shots": shots,
        "queries": queries * ways,
        "repeats": repeats,
        "device": str(torch_device(device)),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "adapt": _spread(adapt_ms),
        "classify": _spread(classify_ms),
    }


def describe_in_process(row: dict) -> str:
    a, c = row["adapt"], row["classify"]
    return (
        f"{row['model']} ({row['what']}), {row['ways']}-way {row['shots']}-shot, {row['repeats']} tasks on {row['device']} "
        f"({row['threads']} threads): adapt median {a['median_ms']} ms [p10 {a['p10_ms']}, p90 {a['p90_ms']}], "
        f"classify {row['queries']} queries median {c['median_ms']} ms [p10 {c['p10_ms']}, p90 {c['p90_ms']}]"
    )


def _compare(args: argparse.Namespace) -> None:
    from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
    from fewshot.models.zoo import shipped_models
    from fewshot.tools.compare import compare_adapt, compare_classify, compare_cold_start, compare_many_tasks
    from fewshot.tools.demo import ensure_bundles

    for flag, value in (("--calls", args.calls), ("--rounds", args.rounds)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: give at least 1")
    bundles = Path(args.bundles) if args.bundles else DEFAULT_BUNDLE_DIR
    log = (lambda row: None) if args.json else print
    if not args.bundles:
        ensure_bundles(bundles, args.model or shipped_models())
    print(
        f"fewshot bench --compare: {torch.get_num_threads()} torch threads, threads={args.threads} per call, "
        f"{platform.processor() or platform.machine()}; ratios, not times, are what carry between machines"
    )
    rows = []
    if "classify" in args.sections:
        rows += compare_classify(
            bundles, args.model, calls=args.calls, rounds=args.rounds, threads=args.threads, seed=args.seed, log=log, pinned=args.pin
        )
    if "adapt" in args.sections:
        rows += compare_adapt(bundles, args.model, args.shots, args.repeats, args.warmup, args.seed, log=log)
    if "cold" in args.sections:
        rows += compare_cold_start(bundles, args.model, seed=args.seed, log=log)
    if "many" in args.sections:
        rows += compare_many_tasks(bundles, args.model, seed=args.seed, log=log)
    if args.json:
        for row in rows:
            print(json.dumps(row))


def run_bench(args: argparse.Namespace) -> None:
    """``fewshot bench`` with its parsed arguments (declared in :mod:`fewshot.cli`): ``--compare``, else
    ``--target``, else in process on exactly one ``--model``."""
    if args.compare:
        _compare(args)
    elif args.target and args.sweep:
        from fewshot.tools.sweep import CONCURRENCY, run_sweep, write

        print(
            f"fewshot bench --target {args.target} --sweep: {args.seconds:g} s per level, 5-way {args.shots}-shot Adapt, "
            f"Classify of {5 * args.queries} PNG queries, seed {args.seed}"
        )
        levels = run_sweep(
            args.target,
            args.model,
            tuple(args.rpc),
            tuple(args.concurrency or CONCURRENCY),
            tuple(args.rates) if args.rates else None,
            args.seconds,
            args.shots,
            args.queries,
            args.seed,
            args.token,
            args.metrics_url,
        )
        write(levels, Path(args.out))
        print(f"table, JSON lines and plot in {args.out}/sweep.md, sweep.jsonl, sweep.png")
    elif args.target and args.options:
        print(
            f"fewshot bench --target {args.target} --options: {args.requests} tasks per row, 5-way {args.shots}-shot, "
            f"{args.queries} queries per class; Adapt without/with report, Classify without/with explain, alternating"
        )
        for row in bench_options(args.target, args.model, args.requests, args.shots, args.queries, args.warmup, args.seed, args.token):
            print(json.dumps(row) if args.json else describe_options(row), flush=True)
    elif args.target:
        print(
            f"fewshot bench --target {args.target}: {args.requests} calls per row, 5-way {args.shots}-shot, "
            f"{args.queries} queries per class, PNG bytes through the client SDK"
        )
        for row in bench_service(
            args.target,
            args.model,
            tuple(args.concurrency or (1, 8)),
            args.requests,
            args.shots,
            args.queries,
            args.warmup,
            args.seed,
            args.token,
        ):
            print(json.dumps(row) if args.json else describe_service(row), flush=True)
    else:
        if not args.model or len(args.model) != 1:
            raise ConfigError("in-process bench takes exactly one --model (or use --target HOST:PORT)")
        row = bench_in_process(
            args.model[0], args.ways, args.shots, args.queries, args.repeats, args.warmup, args.head, args.device, args.threads, args.seed
        )
        print(json.dumps(row) if args.json else describe_in_process(row))
