"""``fewshot bench --sweep``: the latency-throughput curve of a running server, for Adapt and Classify of each model.

Two kinds of load, as Triton's ``perf_analyzer`` and vLLM's ``bench serve`` drive a server:

* **closed loop**: ``c`` clients, each sending its next call when the last one answered (``c`` = 1, 2, 4 ... 64);
* **open loop**: calls arrive at a fixed mean rate with exponential gaps (Poisson arrivals), whether or not
  earlier ones have answered, so queueing delay is measured instead of hidden by clients that slow down with
  the server. A call's latency runs from its scheduled arrival. Unless ``rates`` are given, the rates are
  fractions of the highest closed-loop throughput measured just before (0.25x ... 1.5x).

Each level runs ``seconds`` and reports offered and achieved rate (answered calls per second), p50 / p90 / p99
latency of the answered calls, and apart from them the calls the server refused (RESOURCE_EXHAUSTED: admission
control, counted, never as latency) and any other errors. With the server's metrics endpoint
(``metrics_url``, ``fewshot serve --metrics-port``) a level also gets the server's mean queue wait per call
(``fewshot_queue_seconds``: waiting for an admission slot and for a worker thread), so queueing shows apart from
compute. The knee of each curve is its level of highest power, throughput / p50 latency (Kleinrock 1979): the
load past which latency grows faster than throughput.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.tools.demo import EncodedTask

#: Closed-loop client counts.
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
#: Open-loop rates as fractions of the highest closed-loop throughput.
RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.2, 1.5)
#: Adapted tasks a Classify sweep spreads its calls over.
CLASSIFY_TASKS = 8


@dataclass
class Level:
    """One load level of one curve (latencies in milliseconds, of the answered calls)."""

    model: str
    method: str
    rpc: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    offered_per_s: float | None
    seconds: float
    sent: int
    answered: int
    refused: int
    errors: int
    achieved_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    queue_ms: float | None = None
    knee: bool = False
    error_examples: list[str] = field(default_factory=list)

    @property
    def load(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"{self.offered_per_s:.1f}/s"


Call = Callable[[int], Awaitable[Any]]


async def _timed(call: Call, i: int, start: float) -> tuple[float, str]:
    """``(seconds since start, outcome)``: ``ok``, ``refused`` or the error's text."""
    from fewshot_client.errors import FewShotError, ResourceExhausted

    try:
        await call(i)
        outcome = "ok"
    except ResourceExhausted:
        outcome = "refused"
    except FewShotError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - start, outcome


async def closed_loop(call: Call, concurrency: int, seconds: float) -> tuple[list[tuple[float, str]], float]:
    """``concurrency`` clients calling back to back for ``seconds``: ``(results, wall seconds)``."""
    results: list[tuple[float, str]] = []
    start = time.perf_counter()
    deadline = start + seconds
    counter = iter(range(1 << 62))

    async def client() -> None:
        while time.perf_counter() < deadline:
            results.append(await _timed(call, next(counter), time.perf_counter()))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def open_loop(call: Call, rate: float, seconds: float, rng: np.random.Generator) -> tuple[list[tuple[float, str]], float]:
    """Calls arriving at mean ``rate`` per second (exponential gaps) for ``seconds``, each timed from its
    scheduled arrival: ``(results, wall seconds until the last answer)``."""
    gaps = rng.exponential(1.0 / rate, size=max(1, int(rate * seconds * 2) + 16))
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]
    start = time.perf_counter()
    pending = []
    for i, at in enumerate(arrivals):
        delay = start + float(at) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.ensure_future(_timed(call, i, start + float(at))))
    results = list(await asyncio.gather(*pending))
    return results, max(seconds, time.perf_counter() - start)


def queue_seconds(metrics_url: str | None) -> tuple[float, float] | None:
    """``(sum, count)`` of the server's ``fewshot_queue_seconds`` histogram (every queue), or ``None``."""
    if not metrics_url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "fewshot_queue_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def _level(
    model: str, method: str, rpc: str, mode: str, load: float, results: list[tuple[float, str]], wall: float, queue: float | None
) -> Level:
    ok = [1e3 * s for s, outcome in results if outcome == "ok"]
    refused = sum(outcome == "refused" for _, outcome in results)
    errors = [outcome for _, outcome in results if outcome not in ("ok", "refused")]
    pct = (lambda q: round(float(np.percentile(ok, q)), 1)) if ok else (lambda q: None)
    return Level(
        model,
        method,
        rpc,
        mode,
        int(load) if mode == "closed" else None,
        round(load, 2) if mode == "open" else None,
        round(wall, 2),
        len(results),
        len(ok),
        refused,
        len(errors),
        round(len(ok) / wall, 2),
        pct(50),
        pct(90),
        pct(99),
        queue,
        error_examples=sorted(set(errors))[:3],
    )


def mark_knees(levels: list[Level]) -> None:
    """Mark, per curve (model, method, RPC, mode), the level of highest power: achieved rate / p50 latency."""
    curves: dict[tuple[str, str, str, str], list[Level]] = {}
    for level in levels:
        curves.setdefault((level.model, level.method, level.rpc, level.mode), []).append(level)
    for curve in curves.values():
        scored = [(level.achieved_per_s / level.p50_ms, level) for level in curve if level.p50_ms]
        if scored:
            max(scored, key=lambda pair: pair[0])[1].knee = True


async def sweep_model(
    client: Any,
    model: str,
    method: str,
    episodes: list[EncodedTask],
    rpcs: tuple[str, ...],
    concurrency: tuple[int, ...],
    rates: tuple[float, ...] | None,
    seconds: float,
    seed: int,
    metrics_url: str | None,
    log: Callable[[Level], None],
) -> list[Level]:
    """Closed-loop then open-loop levels of each RPC of one model and method."""
    levels: list[Level] = []
    rng = np.random.default_rng(seed)
    for rpc in rpcs:
        created: list[Any] = []
        if rpc == "adapt":

            async def call(i: int) -> None:
                t = episodes[i % len(episodes)]
                created.append(await client.adapt(t.support, t.support_labels, model=model, method=method, ttl_seconds=600))

        else:
            tasks = [await client.adapt(t.support, t.support_labels, model=model, method=method) for t in episodes[:CLASSIFY_TASKS]]
            queries = episodes[: len(tasks)]

            async def call(i: int) -> None:
                await tasks[i % len(tasks)].classify(queries[i % len(tasks)].queries)

        await call(0)  # warm: the first call of a shape pays one-off costs
        runs: list[tuple[str, float]] = [("closed", c) for c in concurrency]
        peak = 0.0
        for mode, load in runs:
            before = queue_seconds(metrics_url)
            results, wall = await closed_loop(call, int(load), seconds)
            levels.append(_level(model, method, rpc, mode, load, results, wall, _queue_ms(before, metrics_url)))
            peak = max(peak, levels[-1].achieved_per_s)
            log(levels[-1])
            await _delete(created)
        for rate in rates or tuple(round(f * peak, 2) for f in RATE_FRACTIONS if f * peak > 0):
            before = queue_seconds(metrics_url)
            results, wall = await open_loop(call, rate, seconds, rng)
            levels.append(_level(model, method, rpc, "open", rate, results, wall, _queue_ms(before, metrics_url)))
            log(levels[-1])
            await _delete(created)
        if rpc == "classify":
            await _delete(tasks)
    return levels


def _queue_ms(before: tuple[float, float] | None, metrics_url: str | None) -> float | None:
    """The server's mean queue wait per call (ms) since ``before``."""
    after = queue_seconds(metrics_url)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(1e3 * (after[0] - before[0]) / (after[1] - before[1]), 2)


async def _delete(tasks: list[Any]) -> None:
    """Delete the sweep's tasks (outside the timed levels)."""
    while tasks:
        await tasks.pop().delete()


def run_sweep(
    target: str,
    models: list[str] | None = None,
    rpcs: tuple[str, ...] = ("adapt", "classify"),
    concurrency: tuple[int, ...] = CONCURRENCY,
    rates: tuple[float, ...] | None = None,
    seconds: float = 10.0,
    shots: int = 5,
    queries: int = 15,
    seed: int = 0,
    token: str | None = None,
    metrics_url: str | None = None,
    log: Callable[[Level], None] = lambda level: print(describe(level), flush=True),
) -> list[Level]:
    """Every level of every curve of the models ``target`` serves (``models``: only these), knees marked."""
    from fewshot.tools.bench import _served_episodes
    from fewshot_client import FewShotClient
    from fewshot_client.aio import AsyncFewShotClient

    with FewShotClient(target, token=token, timeout=300.0) as sync:
        served = [(info, episodes) for info, _, episodes in _served_episodes(sync, models, 16, shots, queries, seed)]

    async def main() -> list[Level]:
        levels: list[Level] = []
        async with AsyncFewShotClient(target, token=token, timeout=300.0, retries=0) as client:
            for info, episodes in served:
                levels += await sweep_model(
                    client, info.name, info.default_method, episodes, rpcs, concurrency, rates, seconds, seed, metrics_url, log
                )
        return levels

    levels = asyncio.run(main())
    mark_knees(levels)
    return levels


def describe(level: Level) -> str:
    latency = (
        f"p50 {level.p50_ms:8.1f} p90 {level.p90_ms:8.1f} p99 {level.p99_ms:8.1f} ms" if level.p50_ms is not None else "no call answered"
    )
    queue = f", server queue {level.queue_ms:.1f} ms/call" if level.queue_ms is not None else ""
    extra = f", {level.refused} refused" if level.refused else ""
    extra += f", {level.errors} errors ({'; '.join(level.error_examples)})" if level.errors else ""
    return (
        f"{level.model:37s} {level.rpc:8s} {level.mode:6s} {level.load:>9s}: {level.achieved_per_s:7.2f} answered/s, "
        f"{latency}{queue}{extra}{' <- knee' if level.knee else ''}"
    )


def markdown_table(levels: list[Level]) -> str:
    """The levels as one Markdown table (the knee of each curve in bold)."""
    rows = [
        "| model | RPC | load | offered /s | answered /s | p50 ms | p90 ms | p99 ms | server queue ms | refused | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        cells = [
            lv.model,
            lv.rpc,
            f"{lv.mode} {lv.load}",
            "" if lv.offered_per_s is None else f"{lv.offered_per_s:.1f}",
            f"{lv.achieved_per_s:.2f}",
            *("" if v is None else f"{v:.1f}" for v in (lv.p50_ms, lv.p90_ms, lv.p99_ms, lv.queue_ms)),
            str(lv.refused),
            str(lv.errors),
        ]
        if lv.knee:
            cells[2] = f"**{cells[2]} (knee)**"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(levels: list[Level], path: Path) -> None:
    """One panel per (model, RPC): answered calls/s against p50 and p99 latency (log scale), closed loop and
    open loop, the knees circled and the refusals written beside their points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[Level]] = {}
    for level in levels:
        panels.setdefault((level.model, level.rpc), []).append(level)
    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, ((model, rpc), curve) in zip(axes.flat, panels.items()):
        for mode, style in (("closed", "--"), ("open", "-")):
            pts = [lv for lv in curve if lv.mode == mode and lv.p50_ms is not None]
            if not pts:
                continue
            pts.sort(key=lambda lv: lv.concurrency if mode == "closed" else lv.offered_per_s or 0.0)
            x = [lv.achieved_per_s for lv in pts]
            ax.plot(x, [lv.p50_ms for lv in pts], style + "o", label=f"{mode} loop p50", markersize=3)
            ax.plot(x, [lv.p99_ms for lv in pts], style + "^", label=f"{mode} loop p99", markersize=3)
            for lv in pts:
                if lv.knee:
                    ax.plot([lv.achieved_per_s], [lv.p50_ms], "o", markersize=12, markerfacecolor="none", markeredgecolor="red")
                if lv.refused:
                    ax.annotate(f"{lv.refused} refused", (lv.achieved_per_s, lv.p99_ms or lv.p50_ms or 1.0), fontsize=6, color="red")
        ax.set_yscale("log")
        ax.set_title(f"{model} {rpc}", fontsize=8)
        ax.set_xlabel("answered calls / s", fontsize=7)
        ax.set_ylabel("latency (ms)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(levels: list[Level], out: Path) -> None:
    """``out/sweep.jsonl`` (one level per line), ``out/sweep.md`` (the table) and ``out/sweep.png`` (the plot)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.jsonl").write_text("".join(json.dumps(asdict(level)) + "\n" for level in levels))
    (out / "sweep.md").write_text(markdown_table(levels) + "\n")
    plot(levels, out / "sweep.png")
