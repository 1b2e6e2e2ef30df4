"""Where an inner-loop model's Adapt spends its time: the operators of ``torch.profiler`` over a few adaptations.

For each ``--model`` (a bundle of an inner-loop model), ``--tasks`` 5-way 5-shot test tasks (seed 0) are adapted
with the engine the server runs (``model.adapter().adapt``) on one core with one thread, after ``--warmup``
tasks, under ``torch.profiler.profile()``; prints the wall time per Adapt (median) and the operators with the
largest self CPU time, each as its share of the profiled CPU time (the top ``--top``; the rest summed in one
line). Read with ``fewshot bench --compare --sections adapt`` (the engine against the plain reference loop)::

    .venv/bin/python scripts/adapt_profile.py --model tinyimagenet-conv4-cxgrad --model omniglot-conv4-cxgrad
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


def profile(bundles: Path, name: str, tasks: int, warmup: int, top: int) -> list[str]:
    """The printed lines for one model (module docstring)."""
    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Registry
    from fewshot.models.data import load_dataset
    from fewshot.models.episodes import EpisodeSampler

    model = open_bundle(Registry.load(bundles).get(name), "cpu", 1)
    if not hasattr(model, "rule"):
        raise SystemExit(f"adapt_profile: {name} is not an inner-loop model (its Adapt runs no inner loop)")
    data = load_dataset(model.manifest["data"]["dataset"], "test")
    sampler, adapter = EpisodeSampler(data, 5, 5, 15, 0), model.adapter()
    episodes = [sampler.episode(i) for i in range(warmup + tasks)]
    inputs = [(model.spec.normalize(data.images[e.support]), torch.as_tensor(e.support_labels)) for e in episodes]
    for support, labels in inputs[:warmup]:
        adapter.adapt(support, labels)
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for support, labels in inputs[warmup:]:
            start = time.perf_counter()
            adapter.adapt(support, labels)
            walls.append(1e3 * (time.perf_counter() - start))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = [f"{name}: Adapt 5-way 5-shot, {tasks} tasks under the profiler, p50 {statistics.median(walls):.1f} ms"]
    for e in events[:top]:
        lines.append(f"  {e.key:45s} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}")
    rest = sum(e.self_cpu_time_total for e in events[top:])
    lines.append(f"  {'(every other operator)':45s} {100 * rest / total:5.1f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="an inner-loop bundle's name (repeatable)")
    parser.add_argument("--bundles", type=Path, default=Path(os.environ.get("FEWSHOT_BUNDLES", "bundles")))
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    for name in args.model:
        print("\n".join(profile(args.bundles, name, args.tasks, args.warmup, args.top)), flush=True)


if __name__ == "__main__":
    main()
