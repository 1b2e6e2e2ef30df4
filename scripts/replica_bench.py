"""Replicas on one PostgreSQL, measured through the SDK (issue 17, BENCHMARKS.md "Replicas").

Classify throughput with 1 and with 2 ``fewshot serve`` replicas, each pinned to a core of its own
(``taskset``), sharing one real PostgreSQL (started here, as in the tests); the load is spread over the
replicas by the SDK (a list of targets: gRPC round robin) from ``--clients`` threads of this process.
The two set-ups alternate ``--rounds`` times, so both see the same machine; the ratio of medians is
the figure. Then the Adapt latency of one replica on SQLite (``--state-dir``) against one on
PostgreSQL (``--store``), alternating, in the same run.

    .venv/bin/python scripts/replica_bench.py --seconds 10 --rounds 3 --out replica_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.tools.demo import encode_episode
from fewshot.tools.launch import ServerProcess, pin
from fewshot_client import FewShotClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # PostgresServer is a test fixture, not in the installed package
from fixtures.postgres import PostgresServer

MODEL = "omniglot-conv4-directsum"


def _replicas(bundles: Path, url: str, cores: list[int], root: Path) -> list[ServerProcess]:
    procs = []
    for _i, core in enumerate(cores):
        proc = ServerProcess(
            bundles,
            root / f"r{core}-{time.monotonic_ns()}",
            "--store",
            url,
            "--threads",
            "1",
            "--workers",
            "2",
            "--warmup-tasks",
            "1",
            env={"OMP_NUM_THREADS": "1"},
        )
        proc.start()
        pin(proc.pid, {core})  # the replica and all its threads on one core
        procs.append(proc)
    return procs


def _throughput(targets: list[str], task_ids: list[str], queries: list[bytes], clients: int, seconds: float) -> float:
    """Classify calls per second from ``clients`` threads, each over every replica (SDK round robin)."""
    done, stop = [0] * clients, threading.Event()

    def run(k: int) -> None:
        with FewShotClient(targets, timeout=60) as client:
            i = k
            while not stop.is_set():
                client.classify(task_ids[i % len(task_ids)], queries)
                done[k] += 1
                i += clients

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm: every connection up
    start, before = time.perf_counter(), sum(done)
    time.sleep(seconds)
    calls = sum(done) - before
    elapsed = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", default="bundles", help="bundle directory with the model (fewshot export)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=5, help="images per Classify call")
    parser.add_argument("--adapts", type=int, default=30, help="Adapt calls per store in the latency part")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = load_dataset("omniglot", "test")
    per_class = max(1, -(-args.queries // 5))  # enough queries per episode for --queries images per call
    episodes = [encode_episode(data, EpisodeSampler(data, 5, 1, per_class, seed=0).episode(i)) for i in range(16)]
    queries = episodes[0].queries[: args.queries]
    root = Path(tempfile.mkdtemp(prefix="replica-bench-"))
    rows: dict[str, list[float]] = {"1 replica": [], "2 replicas": []}
    with PostgresServer() as pg:
        url = pg.create_database("bench")
        for r in range(args.rounds):
            for name, cores in (("1 replica", [0]), ("2 replicas", [0, 1])) if r % 2 == 0 else (("2 replicas", [0, 1]), ("1 replica", [0])):
                procs = _replicas(Path(args.bundles), url, cores, root)
                try:
                    targets = [p.target for p in procs]
                    with FewShotClient(targets) as client:
                        ids = [client.adapt(e.support, e.support_labels, MODEL).id for e in episodes]
                    rows[name].append(_throughput(targets, ids, queries, args.clients, args.seconds))
                    print(f"round {r}: {name}: {rows[name][-1]:.1f} Classify calls/s", flush=True)
                finally:
                    for p in procs:
                        p.stop()
        latency: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        sqlite = ServerProcess(Path(args.bundles), root / "sqlite", "--threads", "1", "--workers", "2", "--warmup-tasks", "1")
        postgres = ServerProcess(Path(args.bundles), root / "pg", "--store", url, "--threads", "1", "--workers", "2", "--warmup-tasks", "1")
        with sqlite, postgres, FewShotClient(sqlite.target) as a, FewShotClient(postgres.target) as b:
            for i in range(args.adapts):
                for name, client in (("sqlite", a), ("postgresql", b)) if i % 2 == 0 else (("postgresql", b), ("sqlite", a)):
                    e = episodes[i % len(episodes)]
                    start = time.perf_counter()
                    client.adapt(e.support, e.support_labels, MODEL)
                    latency[name].append(1e3 * (time.perf_counter() - start))
    one, two = statistics.median(rows["1 replica"]), statistics.median(rows["2 replicas"])
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": MODEL,
        "clients": args.clients,
        "queries_per_call": args.queries,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "classify_calls_per_s": {
            k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)} for k, v in rows.items()
        },
        "ratio_2_to_1": round(two / one, 2),
        "adapt_ms": {
            k: {
                "median": round(float(np.median(v)), 1),
                "p10": round(float(np.percentile(v, 10)), 1),
                "p90": round(float(np.percentile(v, 90)), 1),
            }
            for k, v in latency.items()
        },
        "adapt_ratio_postgresql_to_sqlite": round(float(np.median(latency["postgresql"]) / np.median(latency["sqlite"])), 2),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
