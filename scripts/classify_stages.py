"""Where a served Classify's time goes on the server's core: its stages, timed one by one in this process.

The same functions the service runs for one Classify call (``FewShotService.Classify``), in order, on one
core with one thread and the server's allocator settings (``server/memory.py``), on ``--queries`` PNG test
images of the model's dataset against a 5-way 5-shot task (seed 0): parsing the request bytes, decoding the
PNGs (``decode_pixels_for_model``), normalising them, the engine (``plan.heavy``: the backbone, or the adapted
network), the head (``plan.finish``: the head and its temperature) and building the response
(``classify_response``, serialised); then the client SDK's own two steps, which run on the client's core: building
the serialised request from the PNG bytes and reading the answer into predictions. Prints per model one line per
stage with its median, p10 and p90 over ``--calls`` calls (after ``--warmup``) and, for the server's stages, its
share of their summed medians; ``--json`` writes them as JSON.
Read it beside ``fewshot bench --compare --pin`` (the served call against the engine alone) and
``scripts/grpc_floor.py`` (gRPC's own round trip)::

    .venv/bin/python scripts/classify_stages.py --model omniglot-conv4-directsum --model tinyimagenet-conv4-sce-nca-directsum
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

STAGES = ("parse", "decode", "normalize", "engine", "head", "response")
#: The client SDK's own work per call, on the client's core: building the request, reading the answer.
CLIENT_STAGES = ("sdk request", "sdk answer")


def stages(bundles: Path, name: str, queries: int, calls: int, warmup: int) -> dict[str, dict[str, float]]:
    """``{stage: {p50_ms, p10_ms, p90_ms, share}}`` for one model (module docstring)."""
    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Registry
    from fewshot.models.data import load_dataset
    from fewshot.models.episodes import EpisodeSampler
    from fewshot.models.preprocess import encode_png
    from fewshot.server.images import ImageLimits, decode_pixels_for_model
    from fewshot.server.requests import classify_response
    from fewshot_client import messages
    from fewshot_proto import fewshot_pb2 as pb

    model = open_bundle(Registry.load(bundles).get(name), "cpu", 1)
    data = load_dataset(model.manifest["data"]["dataset"], "test")
    episode = EpisodeSampler(data, 5, 5, 15, 0).episode(0)
    task = model.adapter().adapt(model.spec.normalize(data.images[episode.support]), torch.as_tensor(episode.support_labels))
    picks = np.random.default_rng(0).choice(len(data.images), queries, replace=False)
    raw = pb.ClassifyRequest(task_id="t", queries=[pb.Image(encoded=encode_png(data.images[i])) for i in picks]).SerializeToString()
    labels, limits = [f"class-{c}" for c in range(5)], ImageLimits()
    pngs = [q.encoded for q in pb.ClassifyRequest.FromString(raw).queries]
    times: dict[str, list[float]] = {s: [] for s in (*STAGES, *CLIENT_STAGES)}
    for i in range(warmup + calls):
        marks = [time.perf_counter()]
        request = pb.ClassifyRequest.FromString(raw)
        marks.append(time.perf_counter())
        pixels = decode_pixels_for_model(list(request.queries), model, limits, "query")
        marks.append(time.perf_counter())
        x = model.spec.normalize(pixels)
        marks.append(time.perf_counter())
        plan = task.plan()
        out = plan.heavy(x)
        marks.append(time.perf_counter())
        logits = plan.finish(out)
        marks.append(time.perf_counter())
        answer = classify_response(logits, labels, 1, task.open_set, None).SerializeToString()
        marks.append(time.perf_counter())
        messages.classify_request("t", pngs, 1, False, None, None, 0).SerializeToString()
        marks.append(time.perf_counter())
        messages.predictions(pb.ClassifyResponse.FromString(answer))
        marks.append(time.perf_counter())
        if i >= warmup:
            for stage, start, end in zip((*STAGES, *CLIENT_STAGES), marks, marks[1:]):
                times[stage].append(1e3 * (end - start))
    total = sum(statistics.median(times[s]) for s in STAGES)
    return {
        stage: {
            "p50_ms": round(statistics.median(v), 3),
            "p10_ms": round(float(np.percentile(v, 10)), 3),
            "p90_ms": round(float(np.percentile(v, 90)), 3),
            "share": round(statistics.median(v) / total, 3) if stage in STAGES else None,
        }
        for stage, v in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="a bundle's name (repeatable)")
    parser.add_argument("--bundles", type=Path, default=Path(os.environ.get("FEWSHOT_BUNDLES", "bundles")))
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="one JSON line per model instead of the table")
    args = parser.parse_args()
    if not 1 <= args.queries <= 1000:
        parser.error(f"--queries {args.queries}: 1 to 1000")
    from fewshot.server import memory

    memory.configure()
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # one core and one thread, as `fewshot bench --compare --pin` runs the server
    torch.set_num_threads(1)
    for name in args.model:
        rows = stages(args.bundles, name, args.queries, args.calls, args.warmup)
        if args.json:
            print(json.dumps({"model": name, "queries": args.queries, "calls": args.calls, "stages": rows}), flush=True)
            continue
        for stage, r in rows.items():
            share = f"{100 * r['share']:5.1f}%" if r["share"] is not None else "(client)"
            print(
                f"{name:37s} {args.queries} queries {stage:11s} p50 {r['p50_ms']:8.3f} ms "
                f"[p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f}] {share}",
                flush=True,
            )


if __name__ == "__main__":
    main()
