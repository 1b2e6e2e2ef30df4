"""Resident memory per cached task: the slope of the process's resident set over many tasks.

Each (model, method) runs in its own process (resident memory is per process): it adapts ``--tasks``
real test tasks through the model's adapter (what the server runs) and puts every task in a
:class:`~fewshot.server.store.TaskStore` whose cache holds them all, sampling VmRSS as it goes. The
slope of a least-squares line through the samples after the first 10% of tasks is the resident cost
of one more cached task; the store's own charge per task and the task's parameter bytes are printed
beside it::

    python scripts/task_memory.py --bundles bundles --tasks 1000 --seed 0 \\
        --runs tinyimagenet-conv4-cxgrad:inner_loop omniglot-conv4-directsum:laplacianshot

``--dtype float16`` holds the adapted weights of inner-loop tasks in half precision (the server's
``--task-dtype``). ``--agreement 600`` instead adapts 600 tasks (5-way 5-shot, 15 queries per class)
once and prints the top-1 agreement of their float16 and float32 weights on the queries.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile


def _rss() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024


def _one(bundles: str, model_name: str, method: str, tasks: int, seed: int, dtype: str) -> dict:
    import numpy as np
    import torch

    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Registry
    from fewshot.models.data import load_dataset
    from fewshot.models.episodes import EpisodeSampler
    from fewshot.server.state import dump_task
    from fewshot.server.store import TaskRecord, TaskStore, resident_bytes

    torch.set_num_threads(1)
    model = open_bundle(Registry.load(bundles).get(model_name), "cpu")
    model.hold_tasks_in(getattr(torch, dtype))
    data = load_dataset(model.manifest["data"]["dataset"], "test")
    ways = max(model.way_range()[0], min(5, model.way_range()[1]))
    sampler = EpisodeSampler(data, ways, 5, 1, seed)
    adapter = model.adapter(method, shots=5)
    episodes = [sampler.episode(i) for i in range(20)]  # cycled: the cost of a task is not its images
    supports = [(model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels)) for ep in episodes]
    with tempfile.TemporaryDirectory() as state:
        store = TaskStore(state, cache_bytes=1 << 40)
        samples, charge, params = [], [], 0
        for i in range(tasks):
            xs, ys = supports[i % len(supports)]
            task, _ = adapter.adapt_scored(xs, ys)
            record = TaskRecord(f"t{i:06d}", model.name, method, [f"c{c}" for c in range(ways)], 0.0, 4e9, len(ys), dump_task(task))
            store.put(record, task)
            charge.append(store.cached_bytes)
            if i == 0:
                params = resident_bytes(task)
            del task
            if (i + 1) % max(1, tasks // 20) == 0:
                gc.collect()
                samples.append((i + 1, _rss()))
        assert store.cached == tasks, "the cache evicted tasks: raise cache_bytes"
    start = len(samples) // 10
    n, rss = np.array([s[0] for s in samples[start:]], float), np.array([s[1] for s in samples[start:]], float)
    slope = float(np.polyfit(n, rss, 1)[0])
    return {
        "model": model_name,
        "method": method,
        "dtype": dtype,
        "tasks": tasks,
        "rss_per_task_kb": round(slope / 1024, 1),
        "charge_per_task_kb": round(charge[-1] / tasks / 1024, 1),
        "tensor_bytes_per_task_kb": round(params / 1024, 1),
        "rss_end_mb": round(samples[-1][1] / 2**20, 1),
    }


def agreement(bundles: str, model_name: str, tasks: int, seed: int) -> dict:
    """Top-1 agreement of float16 and float32 adapted weights, the same adapted tasks, on their queries."""
    import torch

    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Registry
    from fewshot.models.data import load_dataset
    from fewshot.models.episodes import EpisodeSampler
    from fewshot.models.inner_loop.engine import pack

    model = open_bundle(Registry.load(bundles).get(model_name), "cpu")
    data = load_dataset(model.manifest["data"]["dataset"], "test")
    sampler = EpisodeSampler(data, model.way_range()[0], 5, 15, seed)
    adapter = model.adapter()
    same = total = correct32 = correct16 = 0
    for i in range(tasks):
        ep = sampler.episode(i)
        task = adapter.adapt(model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
        xq, yq = model.spec.normalize(data.images[ep.query]), torch.as_tensor(ep.query_labels)
        full = task.classify(xq).argmax(1)
        s = task.state
        s.params, s.bn_stats = pack(s.params, s.bn_stats, torch.float16)
        half = task.classify(xq).argmax(1)
        same, total = same + int((full == half).sum()), total + len(yq)
        correct32, correct16 = correct32 + int((full == yq).sum()), correct16 + int((half == yq).sum())
    return {
        "model": model_name,
        "tasks": tasks,
        "seed": seed,
        "queries": total,
        "top1_agreement": same / total,
        "accuracy_float32": correct32 / total,
        "accuracy_float16": correct16 / total,
    }


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", default="bundles")
    ap.add_argument("--runs", nargs="+", default=["tinyimagenet-conv4-cxgrad:inner_loop"], help="MODEL:METHOD, each in its own process")
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--agreement", type=int, metavar="TASKS", help="float16 vs float32 top-1 agreement on TASKS tasks")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agreement:
        for run in args.runs:
            print(json.dumps(agreement(args.bundles, run.split(":")[0], args.agreement, args.seed)))
        return
    if args.one:
        model, method = args.one.split(":")
        print(json.dumps(_one(args.bundles, model, method, args.tasks, args.seed, args.dtype)))
        return
    for run in args.runs:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                run,
                "--bundles",
                args.bundles,
                "--tasks",
                str(args.tasks),
                "--seed",
                str(args.seed),
                "--dtype",
                args.dtype,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"{run}: {out.stderr.strip().splitlines()[-1]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{row['model']} {row['method']} ({row['dtype']}, {row['tasks']} tasks): resident {row['rss_per_task_kb']} KB "
            f"per task, charged {row['charge_per_task_kb']} KB, tensors {row['tensor_bytes_per_task_kb']} KB; "
            f"process {row['rss_end_mb']} MB at the end"
        )


if __name__ == "__main__":
    main()
