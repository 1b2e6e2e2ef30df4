"""Bounded soak test of the gRPC service: many SDK clients on a seeded RPC mix for a fixed time.

Not part of CI. The BENCHMARKS.md soak figures come from::

    python scripts/soak.py --minutes 10 --clients 16 \\
        --models omniglot-conv4-directsum tinyimagenet-conv4-sce-nca-directsum --seed 0 --json soak.json

which starts its own ``fewshot serve --threads 1 --workers 2`` (on the bundles in ``bundles/``,
exporting any missing or stale one, and a temporary state dir) and stops it at the end. To soak a
server that is already running, give its address and PID (the PID is read locally, in
``/proc/PID/status``)::

    python scripts/soak.py --target 127.0.0.1:50071 --pid 12345 --minutes 10 --clients 16

Before the clock starts, PNG bytes are prepared for a pool of real test episodes of each model's
dataset (5-way, 1 and 5 shots, 15 queries per class), so the clients encode nothing while timed.
Each client thread has its own channel (no retries: every failure counts) and loops until the time
is up over a seeded mix: Adapt 15%, Classify of 1 to 75 of the episode's queries against one of its
live tasks 70%, GetTask 10%, DeleteTask 5%. A thread holds at most ``--max-live`` tasks and deletes
its oldest beyond that (those deletes are DeleteTask calls too); with no live task it adapts.
Latency is recorded for every call, failed ones included; Classify answers must have one
prediction per query with labels of the task, GetTask answers the asked id (else BAD_ANSWER).
The tasks still live when the clock stops are deleted afterwards (not timed; failures count).

The server's resident memory (VmRSS) is sampled every 5 s. ``start`` is the sample at the end of
the warm-up (``--warmup``, default 10% of the run), ``middle`` the one nearest half time,
``end`` the one taken when the last client finished; ``change_pct`` is end over start.

Exit code 0 when no call failed and memory grew at most ``--max-rss-growth`` percent (10) after
the warm-up, 1 otherwise; 2 for a bad setup (unknown model, unreadable PID, server not starting).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

RPCS = ("Adapt", "Classify", "GetTask", "DeleteTask")
#: Share of each RPC in a client's draws (all but Adapt need a live task: with none, it adapts).
MIX = {"Adapt": 0.15, "Classify": 0.70, "GetTask": 0.10, "DeleteTask": 0.05}
DEFAULT_MODELS = ("omniglot-conv4-directsum",)
DEFAULT_SERVE_ARGS = ("--threads", "1", "--workers", "2")
WAYS, SHOTS, QUERIES = 5, (1, 5), 15
RSS_INTERVAL_S = 5.0
BAD_ANSWER = "BAD_ANSWER"

T = TypeVar("T")


# ----------------------------------------------------------------------------- episodes
@dataclass(frozen=True)
class PoolEpisode:
    """One real test episode as the clients send it (PNG bytes, string labels)."""

    model: str
    shots: int
    support: list[bytes]
    support_labels: list[str]
    queries: list[bytes]


def model_dataset(name: str, bundles: Path | None) -> str:
    """The dataset a model was trained on: from its bundle manifest, else from its zoo card."""
    from fewshot.models.zoo import model_dir

    manifest = bundles / name / "manifest.json" if bundles else None
    card = manifest if manifest and manifest.exists() else model_dir(name) / "card.json"
    return str(json.loads(card.read_text())["data"]["dataset"])


def episode_pool(models: Sequence[str], infos: dict[str, Any], bundles: Path | None, per_setting: int, seed: int) -> list[PoolEpisode]:
    """``per_setting`` test episodes of each model and shot count, seeded like ``fewshot eval``."""
    from fewshot.models.data import ImageSet, load_dataset
    from fewshot.models.episodes import EpisodeSampler
    from fewshot.tools.demo import encode_episode

    datasets: dict[str, ImageSet] = {}
    pool: list[PoolEpisode] = []
    for name in models:
        info = infos[name]
        dataset = model_dataset(name, bundles)
        if dataset not in datasets:
            datasets[dataset] = load_dataset(dataset, "test")
        data = datasets[dataset]
        ways = min(max(WAYS, info.min_ways), info.max_ways) if info.max_ways else max(WAYS, info.min_ways)
        for shots in SHOTS:
            if info.max_shots and shots > info.max_shots:
                continue
            sampler = EpisodeSampler(data, ways, shots, QUERIES, seed)
            for i in range(per_setting):
                t = encode_episode(data, sampler.episode(i))
                pool.append(PoolEpisode(name, shots, t.support, t.support_labels, t.queries))
    return pool


# ----------------------------------------------------------------------------- memory
def read_rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MiB, or None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_command(pid: int) -> str:
    """The command line of ``pid`` ("" when unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class RssSampler(threading.Thread):
    """Samples the server's VmRSS every ``interval`` s from ``t0`` and once at ``extra`` s, until
    ``until`` s; :meth:`finish` takes the last sample."""

    def __init__(self, pid: int, t0: float, interval: float, extra: float, until: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.t0, self.interval, self.extra, self.until = pid, t0, interval, extra, until
        self.samples: list[tuple[float, float]] = []  # (seconds since t0, MiB)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        rss = read_rss_mb(self.pid)
        if rss is not None:
            with self._lock:
                self.samples.append((round(time.monotonic() - self.t0, 2), round(rss, 1)))

    def schedule(self) -> Iterator[float]:
        """Sample times in seconds from ``t0``: the ``interval`` grid with ``extra`` merged in."""
        k, extra_pending = 0, True
        while True:
            grid = k * self.interval
            if extra_pending and self.extra <= grid + 1e-9:
                extra_pending = False
                if self.extra < grid - 1e-9:
                    yield self.extra
                    continue
            yield grid
            k += 1

    def run(self) -> None:
        for due in self.schedule():
            if due > self.until - 1.0:  # the end is sampled by finish(), when the last client is done
                return
            if self._stop_event.wait(max(0.0, self.t0 + due - time.monotonic())):
                return
            self.sample()

    def finish(self) -> list[tuple[float, float]]:
        """Stops sampling, takes the final sample and returns the series."""
        self._stop_event.set()
        self.join()
        self.sample()
        return list(self.samples)


def rss_summary(series: list[tuple[float, float]], warmup_s: float, duration_s: float) -> dict[str, Any]:
    """``start`` (first sample at or after the warm-up), ``middle`` (nearest half time), ``end`` (last)."""
    after = [s for s in series if s[0] >= warmup_s - 1e-6]
    if not after:
        return {"start": None, "middle": None, "end": None, "change_pct": None, "warmup_s": warmup_s}
    start, end = after[0], series[-1]
    middle = min(series, key=lambda s: abs(s[0] - duration_s / 2))
    change = 100.0 * (end[1] - start[1]) / start[1]
    return {
        "start": start[1],
        "middle": middle[1],
        "end": end[1],
        "change_pct": round(change, 2),
        "warmup_s": warmup_s,
        "start_at_s": start[0],
        "middle_at_s": middle[0],
        "end_at_s": end[0],
    }


# ----------------------------------------------------------------------------- clients
@dataclass
class Live:
    """A task this client adapted, and the episode it came from (its queries are classified)."""

    task: Any  # fewshot_client.Task
    episode: PoolEpisode


@dataclass
class ClientStats:
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in RPCS})
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rpc, code) -> calls
    images: int = 0


class SoakClient(threading.Thread):
    """One client: its own channel, seeded draws, at most ``max_live`` live tasks."""

    def __init__(
        self, index: int, client: Any, pool: list[PoolEpisode], methods: dict[str, list[str]], seed: int, deadline: float, max_live: int
    ) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.client, self.pool, self.methods = client, pool, methods
        self.rng = np.random.default_rng([seed, 7919, index])
        self.deadline, self.max_live = deadline, max_live
        self.live: deque[Live] = deque()
        self.stats = ClientStats()

    def call(self, rpc: str, fn: Callable[[], T], record: bool = True) -> T | None:
        """Runs one RPC, recording its latency (``record``) and any failure by status code."""
        from fewshot_client import FewShotError

        start = time.perf_counter()
        try:
            return fn()
        except FewShotError as err:
            self.stats.errors[(rpc, err.code.name)] += 1
        except Exception as err:  # anything else (a broken channel, a malformed answer) counts as well
            self.stats.errors[(rpc, type(err).__name__)] += 1
        finally:
            if record:
                self.stats.latency_ms[rpc].append(1e3 * (time.perf_counter() - start))
        return None

    def run(self) -> None:
        ops, weights = list(MIX), np.array(list(MIX.values()))
        while time.monotonic() < self.deadline:
            op = ops[self.rng.choice(len(ops), p=weights / weights.sum())]
            if op == "Adapt" or not self.live:
                self.adapt()
            elif op == "Classify":
                self.classify(self.live[self.rng.integers(len(self.live))])
            elif op == "GetTask":
                self.get(self.live[self.rng.integers(len(self.live))])
            else:
                self.delete(int(self.rng.integers(len(self.live))))

    def adapt(self) -> None:
        ep = self.pool[self.rng.integers(len(self.pool))]
        methods = self.methods[ep.model]
        method = methods[self.rng.integers(len(methods))]
        task = self.call("Adapt", lambda: self.client.adapt(ep.support, ep.support_labels, model=ep.model, method=method))
        if task is not None:
            self.live.append(Live(task, ep))
        while len(self.live) > self.max_live:
            self.delete(0)

    def classify(self, live: Live) -> None:
        n = int(self.rng.integers(1, len(live.episode.queries) + 1))
        picked = self.rng.choice(len(live.episode.queries), size=n, replace=False)
        images = [live.episode.queries[i] for i in picked]
        predictions = self.call("Classify", lambda: live.task.classify(images))
        if predictions is None:
            return
        labels = set(live.task.labels)
        if len(predictions) != n or any(p.label not in labels for p in predictions):
            self.stats.errors[("Classify", BAD_ANSWER)] += 1
        self.stats.images += n

    def get(self, live: Live) -> None:
        info = self.call("GetTask", live.task.info)
        if info is not None and info.task_id != live.task.id:
            self.stats.errors[("GetTask", BAD_ANSWER)] += 1

    def delete(self, index: int, record: bool = True) -> None:
        """Deletes live task number ``index`` (it leaves the live set whether or not the call succeeds)."""
        task = self.live[index].task
        del self.live[index]
        self.call("DeleteTask", task.delete, record=record)

    def cleanup(self) -> None:
        """Deletes the tasks still live (after the clock; errors count, latency is not recorded)."""
        while self.live:
            self.delete(0, record=False)


# ----------------------------------------------------------------------------- the run
def percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    p50, p90, p99 = np.percentile(ms, (50, 90, 99))
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(max(ms)), 2),
    }


def machine() -> dict[str, Any]:
    processor = platform.processor()
    if not processor:  # empty on most Linux systems: the CPU model from /proc/cpuinfo instead
        with contextlib.suppress(OSError):
            processor = next(
                (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                "",
            )
    return {"processor": processor, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def soak(target: str, pid: int, args: argparse.Namespace, bundles: Path | None, log: Callable[[str], None]) -> dict:
    from fewshot_client import FewShotClient, FewShotError

    try:
        with FewShotClient(target, token=args.token, timeout=args.timeout, retries=0) as probe:
            infos = {m.name: m for m in probe.models()}
    except FewShotError as err:
        raise SetupError(f"ListModels on {target} failed: {err}") from err
    unknown = [m for m in args.models if m not in infos]
    if unknown:
        raise SetupError(f"{target} does not serve {', '.join(unknown)} (it serves {', '.join(sorted(infos))})")
    if read_rss_mb(pid) is None:
        raise SetupError(f"cannot read VmRSS of PID {pid} from /proc/{pid}/status")
    command = process_command(pid)
    if "serve" not in command.split():
        raise SetupError(
            f"PID {pid} runs {command!r}, not `fewshot serve`: give the server process itself "
            "(not a shell or launcher around it), else its memory is not what is sampled"
        )
    start = time.perf_counter()
    pool = episode_pool(args.models, infos, bundles, args.pool, args.seed)
    log(f"prepared {len(pool)} test episodes as PNG bytes in {time.perf_counter() - start:.1f} s")

    duration_s = 60.0 * args.minutes
    warmup_s = 0.1 * duration_s if args.warmup is None else args.warmup
    methods = {m: list(infos[m].methods) for m in args.models}
    clients = [FewShotClient(target, token=args.token, timeout=args.timeout, retries=0) for _ in range(args.clients)]
    try:
        t0 = time.monotonic()
        workers = [SoakClient(i, c, pool, methods, args.seed, t0 + duration_s, args.max_live) for i, c in enumerate(clients)]
        sampler = RssSampler(pid, t0, RSS_INTERVAL_S, warmup_s, duration_s)
        sampler.start()
        for w in workers:
            w.start()
        log(f"soaking {target} (pid {pid}) with {args.clients} clients for {duration_s:.0f} s ...")
        for w in workers:
            w.join()
        wall_s = time.monotonic() - t0
        series = sampler.finish()
        for w in workers:
            w.cleanup()
    finally:
        for c in clients:
            c.close()

    errors: Counter[tuple[str, str]] = Counter()
    for w in workers:
        errors.update(w.stats.errors)
    rpcs = {}
    for rpc in RPCS:
        ms = [x for w in workers for x in w.stats.latency_ms[rpc]]
        rpcs[rpc] = {"count": len(ms), **percentiles(ms), "errors": {code: n for (r, code), n in sorted(errors.items()) if r == rpc}}
    by_code: Counter[str] = Counter()
    for (_, code), n in errors.items():
        by_code[code] += n
    images = sum(w.stats.images for w in workers)
    rss = rss_summary(series, warmup_s, duration_s)
    passed = not by_code and rss["change_pct"] is not None and rss["change_pct"] <= args.max_rss_growth
    return {
        "settings": {
            "minutes": args.minutes,
            "clients": args.clients,
            "models": list(args.models),
            "seed": args.seed,
            "max_live": args.max_live,
            "timeout_s": args.timeout,
            "episodes": len(pool),
            "target": args.target or "own server",
            "serve_args": None if args.target else [*DEFAULT_SERVE_ARGS, *args.serve_arg],
            "max_rss_growth_pct": args.max_rss_growth,
            "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "wall_s": round(wall_s, 2),
        "rpcs": rpcs,
        "classify_images": images,
        "classify_images_per_s": round(images / wall_s, 1),
        "errors": dict(sorted(by_code.items())),
        "errors_total": sum(by_code.values()),
        "rss_mb": rss,
        "rss_series": [list(s) for s in series],
        "passed": passed,
    }


def describe(report: dict) -> str:
    s, rss = report["settings"], report["rss_mb"]
    lines = [
        f"soak: {s['clients']} clients x {s['minutes']} min ({report['wall_s']:.0f} s), models "
        f"{', '.join(s['models'])}, seed {s['seed']}, target {s['target']}"
        + (f" ({' '.join(s['serve_args'])})" if s["serve_args"] is not None else ""),
        f"machine: {s['machine']['processor'] or 'unknown CPU'}, {s['machine']['cpus']} CPUs",
        f"{'rpc':11s} {'calls':>7s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'max':>8s}  (ms)  errors",
    ]
    for rpc, r in report["rpcs"].items():
        cells = " ".join(f"{r[k]:8.1f}" if r[k] is not None else f"{'-':>8s}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        errs = ", ".join(f"{c} {n}" for c, n in r["errors"].items()) or "0"
        lines.append(f"{rpc:11s} {r['count']:7d} {cells}        {errs}")
    lines.append(f"classify: {report['classify_images']} images, {report['classify_images_per_s']:.0f} images/s")
    lines.append("errors: " + (", ".join(f"{c} {n}" for c, n in report["errors"].items()) or "none"))
    if rss["start"] is None:
        lines.append("server RSS: no sample after the warm-up")
    else:
        lines.append(
            f"server RSS: start {rss['start']:.1f} MiB (at {rss['start_at_s']:.0f} s, after "
            f"{rss['warmup_s']:.0f} s warm-up), middle {rss['middle']:.1f} MiB (at {rss['middle_at_s']:.0f} s), "
            f"end {rss['end']:.1f} MiB (at {rss['end_at_s']:.0f} s): {rss['change_pct']:+.2f}% "
            f"(limit +{s['max_rss_growth_pct']:g}%)"
        )
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


class SetupError(RuntimeError):
    """The soak cannot start: unknown model, unreadable PID."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the timed run (default 10)")
    p.add_argument("--clients", type=int, default=16, help="client threads, each with its own channel (default 16)")
    p.add_argument("--target", help="HOST:PORT of a running `fewshot serve` (default: start one)")
    p.add_argument("--pid", type=int, help="with --target: the server's PID (its VmRSS is sampled)")
    p.add_argument(
        "--token",
        default=os.environ.get("FEWSHOT_TOKEN"),
        help="bearer token (default $FEWSHOT_TOKEN, which a server started here reads too)",
    )
    p.add_argument("--bundles", help="without --target: bundle directory to serve (default: $FEWSHOT_BUNDLES, else ./bundles)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help=f"without --target: extra `fewshot serve` argument, repeat (after {' '.join(DEFAULT_SERVE_ARGS)}); "
        "write it as --serve-arg=--cache-mb=64",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to adapt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as a JSON object to this file")
    p.add_argument("--max-live", type=int, default=20, help="live tasks per client (the oldest is deleted beyond)")
    p.add_argument("--pool", type=int, default=32, help="test episodes per model and shot count (default 32)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds (default 60)")
    p.add_argument("--max-rss-growth", type=float, default=10.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds before the memory baseline (default: 10%% of the run; ONNX "
        "Runtime's arenas reach their high-water once the largest merged batches have occurred)",
    )
    args = p.parse_args(argv)
    if args.target and args.pid is None:
        p.error("--target needs --pid (the server's resident memory is part of the check)")
    if args.target and (args.bundles or args.serve_arg):
        p.error("--bundles and --serve-arg start a server: not with --target")
    if args.pid is not None and not args.target:
        p.error("--pid goes with --target")
    if args.minutes <= 0 or args.clients < 1 or args.max_live < 1 or args.pool < 1:
        p.error("--minutes, --clients, --max-live and --pool must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        with contextlib.ExitStack() as stack:
            if args.target:
                target, pid, bundles, server = args.target, args.pid, Path(args.bundles) if args.bundles else None, None
            else:
                from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
                from fewshot.models.zoo import shipped_models
                from fewshot.tools.demo import ensure_bundles
                from fewshot.tools.launch import ServerProcess

                bundles = Path(args.bundles) if args.bundles else DEFAULT_BUNDLE_DIR
                ensure_bundles(bundles, [m for m in args.models if m in shipped_models()], log=log)
                state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fewshot-soak-")))
                server = ServerProcess(bundles, state, *DEFAULT_SERVE_ARGS, *args.serve_arg, log=state / "serve.log")
                try:
                    stack.enter_context(server)
                except (RuntimeError, TimeoutError) as err:
                    raise SetupError(str(err)) from err
                target, pid = server.target, server.proc.pid
                log(
                    f"fewshot serve on {target} (pid {pid}), bundles {bundles}, state in {state}: "
                    f"{' '.join([*DEFAULT_SERVE_ARGS, *args.serve_arg])}"
                )
            report = soak(target, pid, args, bundles, log)
            if server is not None and report["errors_total"]:
                log(f"--- last lines of the server log ({server.log}) ---\n{server.log.read_text()[-3000:]}")
    except SetupError as err:
        print(f"soak: {err}", file=sys.stderr)
        return 2
    print(describe(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
