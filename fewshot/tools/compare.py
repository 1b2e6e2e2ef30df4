"""``fewshot bench --compare``: the served path against its own engine, side by side in one run.

**Classify.** For each model: the raw engine is the ONNX Runtime session the server itself runs (the
backbone; for inner-loop models the adapted network with a task's weights), called in this process on
pre-decoded, normalised tensors with the same thread count; the served path is a real ``fewshot serve``
child process on loopback, called through the client SDK with PNG bytes of the same images. Both run
for 1, 8 and 64 queries per call at concurrency 1 and 8, alternating raw and served rounds so that
drift on a shared machine hits both; a row gives each side's p50 latency and images/s and the ratio
served / raw throughput.

**Adapt.** The engine's inner loop (``fewshot.models.inner_loop.engine``) against the plain reference loop
(``fewshot.models.inner_loop.reference``: functional Conv-4, ``torch.autograd.grad``, ``theta -= alpha g``,
CxGrad's scaling, the same steps and BatchNorm semantics, the whole network on the images at every step) and
against the same loop fed the fixed stem's output once (the stricter reference), on the same support sets,
the three alternating within each repeat. The reference covers MAML and CxGrad; other rules are reported
without it. The engine's probabilities on the task's queries are compared with the reference's on every repeat
(the largest difference printed, flagged past 1e-4; the tests pin the shipped models' adapted weights within 1e-5). Where the CPU has
native bfloat16, the engine under ``--inner-precision bfloat16`` is timed too, with its top-1
agreement with float32.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fewshot.errors import ConfigError
from fewshot.export.loader import open_bundle
from fewshot.export.registry import Registry
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import family_of
from fewshot.models.inner_loop.family import InnerLoopFamily, bfloat16_supported
from fewshot.models.inner_loop.onnx_network import network_inputs
from fewshot.models.inner_loop.reference import Arch, reference_adapt, reference_forward
from fewshot.models.inner_loop.rules import ContextualGradientScaling, UpdateRule
from fewshot.models.preprocess import encode_png

QUERIES, CONCURRENCY = (1, 8, 64), (1, 8)


def _calls(fn: Callable[[int], Any], calls: int, concurrency: int) -> tuple[list[float], float]:
    """``fn(i)`` for ``i < calls`` from ``concurrency`` threads -> (per-call ms, wall seconds)."""

    def timed(i: int) -> float:
        start = time.perf_counter()
        fn(i)
        return 1e3 * (time.perf_counter() - start)

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        ms = list(pool.map(timed, range(calls)))
        return ms, time.perf_counter() - start


def _side(ms_rounds: list[list[float]], walls: list[float], images: int) -> dict[str, float]:
    """Median over rounds of p50 latency and of throughput."""
    return {
        "p50_ms": round(statistics.median(float(np.median(m)) for m in ms_rounds), 2),
        "p90_ms": round(statistics.median(float(np.percentile(m, 90)) for m in ms_rounds), 2),
        "images_per_s": round(statistics.median(images / w for w in walls), 1),
    }


def compare_classify(
    bundles: Path,
    models: list[str] | None = None,
    queries: tuple[int, ...] = QUERIES,
    concurrency: tuple[int, ...] = CONCURRENCY,
    calls: int = 32,
    rounds: int = 3,
    threads: int = 0,
    seed: int = 0,
    log: Callable[[str], None] = print,
    pinned: bool = False,
) -> list[dict]:
    """One row per (model, queries per call, concurrency). ``pinned`` (a machine of 2 cores or more): the server
    child and the raw engine run on the last core with one thread, the client on the others, so the served side
    is measured without the client's CPU."""
    from fewshot.tools.launch import ServerProcess, pin
    from fewshot_client import FewShotClient

    registry = Registry.load(bundles)
    names = models or sorted(registry.bundles)
    rows = []
    cores = sorted(os.sched_getaffinity(0))
    if pinned and len(cores) < 2:
        raise ConfigError("--pin needs 2 cores or more (the server on one, the client on the others)")
    server_core, client_cores = {cores[-1]}, set(cores[:-1])
    threads = 1 if pinned else threads
    here = os.getpid()
    with tempfile.TemporaryDirectory(prefix="fewshot-compare-") as state:
        with (
            ServerProcess(bundles, Path(state), "--threads", str(threads), "--metrics-port", "0", log=Path(state) / "serve.log") as server,
            FewShotClient(server.target, timeout=300) as client,
        ):
            if pinned:
                pin(server.pid, server_core)
            for name in names:
                model = open_bundle(registry.get(name), "cpu", threads)
                data = load_dataset(model.manifest["data"]["dataset"], "test")
                ways = max(model.way_range()[0], min(5, model.way_range()[1]))
                ep = EpisodeSampler(data, ways, 5, 15, seed).episode(0)
                support = model.spec.normalize(data.images[ep.support])
                task = model.adapter().adapt(support, torch.as_tensor(ep.support_labels))
                served = client.adapt(
                    [encode_png(data.images[i]) for i in ep.support], [f"class-{c}" for c in ep.support_labels], model=name
                )
                pool = np.random.default_rng(seed).choice(len(data.images), max(queries) * 4, replace=False)
                raw_run = _raw_engine(model, task)
                for q in queries:
                    picks = [pool[(i * q) % len(pool) :][:q] for i in range(calls)]
                    picks = [p if len(p) == q else pool[:q] for p in picks]
                    tensors = [np.ascontiguousarray(model.spec.normalize(data.images[p]).numpy()) for p in picks]
                    pngs = [[encode_png(data.images[i]) for i in p] for p in picks]
                    for c in concurrency:
                        raw_ms, raw_wall, srv_ms, srv_wall = [], [], [], []
                        raw_run(tensors[0])  # warm both sides for this shape
                        served.classify(pngs[0])
                        for _ in range(rounds):
                            if pinned:  # the raw engine on the server's core, the client on the others
                                pin(here, server_core)
                            ms, wall = _calls(lambda i: raw_run(tensors[i]), calls, c)
                            raw_ms.append(ms)
                            raw_wall.append(wall)
                            if pinned:
                                pin(here, client_cores)
                            ms, wall = _calls(lambda i: served.classify(pngs[i]), calls, c)
                            srv_ms.append(ms)
                            srv_wall.append(wall)
                        raw, srv = _side(raw_ms, raw_wall, q * calls), _side(srv_ms, srv_wall, q * calls)
                        row = {
                            "model": name,
                            "queries": q,
                            "concurrency": c,
                            "calls": calls,
                            "rounds": rounds,
                            "threads": threads,
                            "pinned": pinned,
                            "raw": raw,
                            "served": srv,
                            "throughput_ratio": round(srv["images_per_s"] / raw["images_per_s"], 2),
                            "p50_overhead_ms": round(srv["p50_ms"] - raw["p50_ms"], 2),
                        }
                        log(describe_classify(row))
                        rows.append(row)
                served.delete()
    if pinned:
        pin(here, set(cores))
    return rows


def _raw_engine(model: Any, task: Any) -> Callable[[np.ndarray], np.ndarray]:
    """What the server's engine runs for a Classify of ``images``: the backbone session (metric
    models) or the network session with the task's weights (inner-loop models), nothing else."""
    if hasattr(task, "extract"):
        session = task.extract.session
        return lambda images: session.run(None, {"images": images})[0]
    s = task.state
    feeds = {k: v.cpu().numpy() for k, v in network_inputs(s.net, *s.weights(), s.step).items()}
    return lambda images: task.session.run(None, {**feeds, "images": images})[0]


def describe_classify(row: dict) -> str:
    r, s = row["raw"], row["served"]
    return (
        f"{row['model']:37s} Classify {row['queries']:2d} queries c={row['concurrency']}: raw engine p50 "
        f"{r['p50_ms']:7.2f} ms {r['images_per_s']:7.0f} img/s | served p50 {s['p50_ms']:7.2f} ms "
        f"{s['images_per_s']:7.0f} img/s | ratio {row['throughput_ratio']:.2f}, overhead {row['p50_overhead_ms']:+.2f} ms"
    )


# -- adaptation -------------------------------------------------------------------------------------
def clock(device: str) -> Callable[[], float]:
    """``time.perf_counter``, after waiting for the device's queued work where it is a CUDA device."""
    if torch.device(device).type != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return now


def reference_settings(model: InnerLoopFamily) -> dict[str, Any] | None:
    """The keywords of :func:`reference_adapt` that reproduce ``model``'s inner loop, or ``None`` where the
    reference does not cover its rule (MAML and CxGrad with one set of BatchNorm parameters are covered)."""
    rule = model.rule
    if model.net.per_step_bn or type(rule) not in (UpdateRule, ContextualGradientScaling):
        return None
    cxgrad = type(rule) is ContextualGradientScaling
    return {
        "steps": model.loop["steps"],
        "alpha": rule.alpha,
        "arch": Arch.of(model.net),
        "head_alpha": rule.head_alpha,
        "head_init": model.head_init,
        "g_phi": cast(ContextualGradientScaling, rule).g_phi if cxgrad else None,
        "beta": cast(ContextualGradientScaling, rule).beta if cxgrad else 1.0,
    }


def compare_adapt(
    bundles: Path,
    models: list[str] | None = None,
    shots: int = 5,
    repeats: int = 10,
    warmup: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> list[dict]:
    """One row per inner-loop model: engine and reference p50 of one Adapt (the reference as written, and
    fed the stem's output once), the ratios, the agreement of their probabilities on the task's queries;
    on ``device`` (``cuda``: the clock waits for the device)."""
    registry = Registry.load(bundles)
    rows = []
    now = clock(device)
    for name in models or sorted(registry.bundles):
        model = open_bundle(registry.get(name), device)
        if not isinstance(model, InnerLoopFamily):
            continue
        settings = reference_settings(model)
        data = load_dataset(model.manifest["data"]["dataset"], "test")
        lo, hi = model.way_range()
        ways = max(lo, min(5, hi))  # 5-way, the setting every shipped model was trained for
        sampler = EpisodeSampler(data, ways, shots, 15, seed)
        adapter = model.adapter(bn_mode="support").adapter
        bf16 = None
        if bfloat16_supported() or torch.device(device).type == "cuda":
            model.adapt_in(torch.bfloat16)
            bf16 = model.adapter(bn_mode="support").adapter
            model.adapt_in(torch.float32)
        times: dict[str, list[float]] = {"engine": [], "reference": [], "stem_once": [], "bf16": []}
        worst, agree, total = 0.0, 0, 0
        for i in range(warmup + repeats):
            ep = sampler.episode(i)
            xs, ys = model.spec.normalize(data.images[ep.support]).to(device), torch.as_tensor(ep.support_labels).to(device)
            xq = model.spec.normalize(data.images[ep.query]).to(device)
            # the sides alternate within each repeat, so drift on a shared machine hits them alike
            start = now()
            state = adapter.adapt(xs, ys)
            took = {"engine": now() - start}
            if settings is not None:
                for side, once in (("reference", False), ("stem_once", True)):
                    start = now()
                    params, stats = reference_adapt(model.params, xs, ys, stem_once=once, **settings)
                    took[side] = now() - start
            if bf16 is not None:
                start = now()
                half = bf16.adapt(xs, ys)
                took["bf16"] = now() - start
            if i < warmup:
                continue
            for side, seconds in took.items():
                times[side].append(1e3 * seconds)
            if bf16 is not None:
                agree += int((half.logits(xq).argmax(1) == state.logits(xq).argmax(1)).sum())
                total += len(xq)
            if settings is not None:
                with torch.no_grad():
                    ref = reference_forward(params, xq, stats, settings["arch"]).cpu()
                worst = max(worst, float((ref.softmax(1) - state.logits(xq).softmax(1)).abs().max()))
        engine = float(np.median(times["engine"]))
        row = {
            "model": name,
            "method": model.manifest["method"],
            "ways": ways,
            "shots": shots,
            "steps": model.loop["steps"],
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "engine_p50_ms": round(engine, 1),
            "engine_spread_ms": _spread(times["engine"]),
        }
        if settings is not None:
            ref, once = float(np.median(times["reference"])), float(np.median(times["stem_once"]))
            row |= {
                "reference_p50_ms": round(ref, 1),
                "reference_spread_ms": _spread(times["reference"]),
                "speedup": round(ref / engine, 2),
                "stem_once_p50_ms": round(once, 1),
                "stem_once_speedup": round(once / engine, 2),
                "max_abs_probability_diff": worst,
            }
            row["within_1e-4"] = worst <= 1e-4  # printed, not raised: float rounding through a loop can grow past it
        if times["bf16"]:
            row |= {"bf16_p50_ms": round(float(np.median(times["bf16"])), 1), "bf16_top1_agreement": round(agree / total, 4)}
            if settings is not None:
                row["bf16_speedup"] = round(float(np.median(times["reference"])) / float(np.median(times["bf16"])), 2)
        log(describe_adapt(row))
        rows.append(row)
    return rows


def _spread(ms: list[float]) -> list[float]:
    """``[p10, p90]`` of ``ms``, rounded."""
    return [round(float(np.percentile(ms, 10)), 1), round(float(np.percentile(ms, 90)), 1)]


def describe_adapt(row: dict) -> str:
    ref = (
        (
            f"reference loop p50 {row['reference_p50_ms']:.1f} ms, engine {row['speedup']:.2f}x it; the reference fed the stem once "
            f"p50 {row['stem_once_p50_ms']:.1f} ms, engine {row['stem_once_speedup']:.2f}x it; probabilities within "
            f"{row['max_abs_probability_diff']:.1e}" + ("" if row["within_1e-4"] else " (NOT within 1e-4)")
        )
        if "speedup" in row
        else "no plain reference for this rule"
    )
    half = (
        (
            f" | bfloat16 p50 {row['bf16_p50_ms']:.1f} ms"
            + (f", {row['bf16_speedup']:.2f}x the reference" if "bf16_speedup" in row else "")
            + f", top-1 agreement with float32 {100 * row['bf16_top1_agreement']:.2f}%"
        )
        if "bf16_p50_ms" in row
        else ""
    )
    return (
        f"{row['model']:37s} Adapt {row['ways']}-way {row['shots']}-shot, {row['steps']} steps: engine p50 "
        f"{row['engine_p50_ms']:.1f} ms [p10 {row['engine_spread_ms'][0]}, p90 {row['engine_spread_ms'][1]}] | {ref}{half}"
    )


# -- cold start -------------------------------------------------------------------------------------
def compare_cold_start(
    bundles: Path, models: list[str] | None = None, later: int = 5, seed: int = 0, log: Callable[[str], None] = print
) -> list[dict]:
    """Per model and ``--warmup-tasks`` 0 or 1: a fresh ``fewshot serve``, then the first Adapt and the
    median of the ``later`` ones after it (5-way 5-shot real tasks of the model's own method)."""
    from fewshot.tools.launch import ServerProcess
    from fewshot_client import FewShotClient

    registry = Registry.load(bundles)
    rows = []
    for name in models or sorted(registry.bundles):
        manifest = registry.get(name).manifest
        data = load_dataset(manifest["data"]["dataset"], "test")
        ways = max(int(manifest["limits"].get("min_ways", 2)), min(5, int(manifest["limits"].get("max_ways", 5))))
        sampler = EpisodeSampler(data, ways, 5, 15, seed)
        tasks = [sampler.episode(i) for i in range(later + 1)]
        encoded = [([encode_png(data.images[i]) for i in ep.support], [f"class-{c}" for c in ep.support_labels]) for ep in tasks]
        for warm in (0, 1):
            with tempfile.TemporaryDirectory(prefix="fewshot-cold-") as state:
                started = time.perf_counter()
                with ServerProcess(bundles, Path(state), "--warmup-tasks", str(warm), log=Path(state) / "serve.log") as server:
                    ready = time.perf_counter() - started
                    with FewShotClient(server.target, timeout=300) as client:
                        ms = []
                        for images, labels in encoded:
                            start = time.perf_counter()
                            client.adapt(images, labels, model=name).delete()
                            ms.append(1e3 * (time.perf_counter() - start))
            row = {
                "model": name,
                "warmup_tasks": warm,
                "start_s": round(ready, 1),
                "first_adapt_ms": round(ms[0], 1),
                "later_adapt_p50_ms": round(float(np.median(ms[1:])), 1),
            }
            log(
                f"{name:37s} --warmup-tasks {warm}: server ready in {row['start_s']:5.1f} s, first Adapt "
                f"{row['first_adapt_ms']:7.1f} ms, next {later} p50 {row['later_adapt_p50_ms']:7.1f} ms"
            )
            rows.append(row)
    return rows


# -- many tasks at once -----------------------------------------------------------------------------
def compare_many_tasks(
    bundles: Path,
    models: list[str] | None = None,
    tasks: int = 16,
    calls: int = 24,
    rounds: int = 2,
    adapt_tasks: tuple[int, ...] = (1, 8, 32),
    seed: int = 0,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    served_rows: bool = True,
) -> list[dict]:
    """Per inner-loop model: (1) the engine: ``tasks`` tasks' one-query Classify as one network call
    each vs one stacked call (:class:`~fewshot.models.inner_loop.stacked.StackedClassify`), and Adapt of
    ``n`` 5-way 1-shot tasks one by one vs stacked (``adapt_many``); (2) served: ``tasks`` client
    threads, each classifying one query at a time against its own task, on a ``fewshot serve
    --merge-tasks off`` and an ``on`` child, rounds alternating (``served_rows``). The engine parts run on
    ``device``."""
    from fewshot.models.inner_loop.stacked import StackedClassify
    from fewshot.tools.launch import ServerProcess
    from fewshot_client import FewShotClient

    registry = Registry.load(bundles)
    names = [n for n in models or sorted(registry.bundles) if issubclass(family_of(registry.get(n).manifest), InnerLoopFamily)]
    rows = []
    now = clock(device)
    for name in names:
        model = open_bundle(registry.get(name), device)
        data = load_dataset(model.manifest["data"]["dataset"], "test")
        ways = model.way_range()[0]
        sampler = EpisodeSampler(data, ways, 1, 1, seed)
        episodes = [sampler.episode(i) for i in range(max(tasks, *adapt_tasks))]
        supports = [model.spec.normalize(data.images[ep.support]).to(device) for ep in episodes]
        labels = [torch.as_tensor(ep.support_labels).to(device) for ep in episodes]
        queries = [model.spec.normalize(data.images[ep.query[:1]]).to(device) for ep in episodes]
        adapter = model.adapter(bn_mode="support")
        adapted = [adapter.adapt(x, y) for x, y in zip(supports[:tasks], labels[:tasks])]
        merger = StackedClassify(model.net)
        states = [t.state for t in adapted]

        def per_task() -> None:
            for t, q in zip(adapted, queries):
                t.logits(q)

        times = {"per_task": [], "stacked": []}
        for _ in range(3 + 20):
            for key, fn in (("per_task", per_task), ("stacked", lambda: merger.logits(states, queries[:tasks]))):
                start = now()
                fn()
                times[key].append(1e3 * (now() - start))
        per, stacked = (float(np.median(times[k][3:])) for k in ("per_task", "stacked"))
        row = {
            "model": name,
            "section": "engine classify",
            "tasks": tasks,
            "per_task_p50_ms": round(per, 2),
            "stacked_p50_ms": round(stacked, 2),
            "speedup": round(per / stacked, 2),
        }
        log(f"{name:37s} engine: {tasks} tasks x 1 query, one call each p50 {per:.2f} ms, stacked {stacked:.2f} ms: {row['speedup']:.2f}x")
        rows.append(row)
        for n in adapt_tasks:
            seq_s, many_s = [], []
            for _r in range(3):
                start = now()
                for x, y in zip(supports[:n], labels[:n]):
                    adapter.adapt(x, y)
                mid = now()
                adapter.adapt_many(supports[:n], labels[:n])
                seq_s.append(mid - start)
                many_s.append(now() - mid)
            seq, many = float(np.median(seq_s)), float(np.median(many_s))
            row = {
                "model": name,
                "section": "engine adapt",
                "tasks": n,
                "sequential_tasks_per_s": round(n / seq, 1),
                "batched_tasks_per_s": round(n / many, 1),
                "speedup": round(seq / many, 2),
            }
            log(
                f"{name:37s} engine: Adapt {n:2d} tasks 5-way 1-shot, one by one {row['sequential_tasks_per_s']:.1f} "
                f"tasks/s, stacked {row['batched_tasks_per_s']:.1f} tasks/s: {row['speedup']:.2f}x"
            )
            rows.append(row)
        if not served_rows:
            continue
        encoded = [
            ([encode_png(data.images[i]) for i in ep.support], [f"c{c}" for c in ep.support_labels], [encode_png(data.images[ep.query[0]])])
            for ep in episodes[:tasks]
        ]
        with tempfile.TemporaryDirectory(prefix="fewshot-many-") as state:
            off = ServerProcess(
                bundles,
                Path(state) / "off",
                "--merge-tasks",
                "off",
                "--warmup-tasks",
                "0",
                "--metrics-port",
                "0",
                log=Path(state) / "off.log",
            )
            on = ServerProcess(
                bundles, Path(state) / "on", "--merge-tasks", "on", "--warmup-tasks", "0", "--metrics-port", "0", log=Path(state) / "on.log"
            )
            with off, on, FewShotClient(off.target, timeout=300) as c_off, FewShotClient(on.target, timeout=300) as c_on:
                served = {}
                for key, client in (("off", c_off), ("on", c_on)):
                    handles = [client.adapt(s, l, model=name) for s, l, _ in encoded]
                    served[key] = [(h, q) for h, (_, _, q) in zip(handles, encoded)]
                    for h, q in served[key]:
                        h.classify(q)
                walls: dict[str, list[float]] = {"off": [], "on": []}
                for _ in range(rounds):
                    for key in ("off", "on"):

                        def client_loop(i: int, pairs=served[key]) -> None:
                            handle, q = pairs[i]
                            for _ in range(calls):
                                handle.classify(q)

                        with ThreadPoolExecutor(tasks) as pool:
                            start = time.perf_counter()
                            list(pool.map(client_loop, range(tasks)))
                            walls[key].append(time.perf_counter() - start)
            ips = {k: tasks * calls / float(np.median(w)) for k, w in walls.items()}
            row = {
                "model": name,
                "section": "served classify",
                "clients": tasks,
                "calls_per_client": calls,
                "rounds": rounds,
                "merge_off_images_per_s": round(ips["off"], 1),
                "merge_on_images_per_s": round(ips["on"], 1),
                "speedup": round(ips["on"] / ips["off"], 2),
            }
            log(
                f"{name:37s} served: {tasks} clients x 1 query on {tasks} tasks, --merge-tasks off {ips['off']:.0f} images/s, "
                f"on {ips['on']:.0f} images/s: {row['speedup']:.2f}x"
            )
            rows.append(row)
    return rows
