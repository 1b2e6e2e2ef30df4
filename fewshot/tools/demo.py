"""``fewshot demo``: the product end to end on embedded defaults.

Exports any missing bundle, starts ``fewshot serve`` (in-process ONNX Runtime, on-disk task store),
drives it with the client SDK through real Omniglot and Tiny ImageNet test tasks (support and
queries as PNG bytes), prints accuracy with its 95% interval next to the RESULTS.md figure for the
same settings and tasks, and per-call latency, then stops the server.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot.models.data import ImageSet, load_dataset
from fewshot.models.episodes import Episode, EpisodeSampler
from fewshot.models.evaluation import summarize
from fewshot.models.family import family_of
from fewshot.models.preprocess import encode_png
from fewshot.models.zoo import ZOO_DIR, shipped_models

#: The flagship model of each path and dataset (the ablation and baseline models are served too).
DEMO_MODELS = ("omniglot-conv4-directsum", "tinyimagenet-conv4-sce-nca-directsum", "omniglot-conv4-cxgrad", "tinyimagenet-conv4-cxgrad")


@dataclass
class EncodedTask:
    """One episode as the client sends it: PNG bytes and string labels."""

    support: list[bytes]
    support_labels: list[str]
    queries: list[bytes]
    query_labels: list[str]


def encode_episode(data: ImageSet, ep: Episode) -> EncodedTask:
    return EncodedTask(
        [encode_png(data.images[i]) for i in ep.support],
        [f"class-{c}" for c in ep.support_labels],
        [encode_png(data.images[i]) for i in ep.query],
        [f"class-{c}" for c in ep.query_labels],
    )


def ensure_bundles(out: Path, names: list[str], log=print) -> None:
    """Export every shipped model in ``names`` whose bundle is missing or older than its weights."""
    from fewshot.export.bundle import bundle_is_current, export_model

    for name in names:
        if not bundle_is_current(out / name, ZOO_DIR / name):
            log(f"exporting {name} -> {out / name}")
            export_model(name, out, log=lambda msg: log("  " + msg))


#: Tasks per row of a plain ``make demo`` (minutes); ``make demo FULL=1`` runs RESULTS.md's 600.
QUICK_TASKS = 40


def run_demo(
    bundles: Path,
    tasks: int = QUICK_TASKS,
    seed: int = 0,
    models: list[str] | None = None,
    shots: tuple[int, ...] = (1, 5),
    keep: bool = False,
) -> None:
    """The demo rows; with ``keep`` the server stays up afterwards (HTTP API and web console too) until Ctrl-C."""
    from fewshot.export.registry import Registry
    from fewshot.tools.launch import ServerProcess
    from fewshot_client import FewShotClient

    wanted = models or [m for m in DEMO_MODELS if m in shipped_models()]
    ensure_bundles(bundles, wanted)  # only what the demo shows: each export checks parity on real images
    manifests = {name: b.manifest for name, b in Registry.load(bundles).bundles.items()}
    names = [m for m in wanted if m in manifests]
    from fewshot.tools.launch import free_port

    http_port = free_port()
    with tempfile.TemporaryDirectory(prefix="fewshot-demo-") as state:
        server = ServerProcess(bundles, Path(state), "--http-port", str(http_port), log=Path(state) / "serve.log").start()
        try:
            print(f"fewshot serve on {server.target} (pid {server.proc.pid}): embedded ONNX Runtime, task store in {state}")
            print(f"web console and HTTP/JSON API: http://127.0.0.1:{http_port}/")
            print(f"{tasks} test tasks per row (seed {seed}), 15 queries per class, PNG bytes through the client SDK")
            with FewShotClient(server.target, timeout=120.0) as client:
                infos = {m.name: m for m in client.models()}
                for name in names:
                    m = manifests[name]
                    data = load_dataset(m["data"]["dataset"], "test")
                    ways = max(infos[name].min_ways, min(5, infos[name].max_ways))
                    measured = [k for k in shots if any(_figure(m, ways, k, meth) for meth in infos[name].methods)]
                    first = True
                    for k in measured or shots:  # the RESULTS.md settings, so every row has a figure to compare with
                        for method in infos[name].methods:
                            _demo_row(client, name, method, m, data, ways, k, tasks, seed, sample=first)
                            first = False
            if keep:
                print(f"serving until Ctrl-C: gRPC {server.target}, web console http://127.0.0.1:{http_port}/", flush=True)
                try:
                    server.proc.wait()
                except KeyboardInterrupt:
                    pass
        finally:
            server.stop()


def _figure(manifest: dict, ways: int, shots: int, method: str) -> dict | None:
    """The RESULTS.md figure (``accuracy``, ``ci95``, ``tasks``) the model's card holds for this setting."""
    return manifest.get("accuracy", {}).get(family_of(manifest).accuracy_key(manifest, ways, shots, method))


def _demo_row(
    client, name: str, method: str, manifest: dict, data: ImageSet, ways: int, shots: int, tasks: int, seed: int, sample: bool = False
) -> None:
    """One row: ``tasks`` tasks adapted and classified through the SDK; with ``sample``, the first task's first
    three served predictions are printed under it (label, then the ranked top 3 with probabilities)."""
    samples: list[str] = []
    sampler = EpisodeSampler(data, ways, shots, 15, seed)
    per_task, adapt_ms, classify_ms = [], [], []
    for i in tqdm(
        range(tasks), desc=f"{name} {method} {shots}-shot", unit="task", leave=False, mininterval=1, disable=None
    ):  # a bar on a terminal, none in a log
        t = encode_episode(data, sampler.episode(i))
        start = time.perf_counter()
        task = client.adapt(t.support, t.support_labels, model=name, method=method)
        mid = time.perf_counter()
        predictions = task.classify(t.queries, top_k=3)
        end = time.perf_counter()
        if sample and i == 0:
            samples = [
                f"    served: query of {y} -> " + ", ".join(f"{label} {p:.3f}" for label, p in pred.ranked)
                for pred, y in zip(predictions[::15][:3], t.query_labels[::15][:3])
            ]
        task.delete()
        per_task.append(float(np.mean([p.label == y for p, y in zip(predictions, t.query_labels)])))
        adapt_ms.append(1e3 * (mid - start))
        classify_ms.append(1e3 * (end - mid))
    res = summarize(per_task)
    ref = _figure(manifest, ways, shots, method)
    ref_txt = "   [no RESULTS.md figure]"
    if ref:
        # fewer tasks than RESULTS.md: the two intervals overlap when the served figure agrees with it
        inside = abs(res.accuracy - ref["accuracy"]) <= ref["ci95"] + res.ci95
        ref_txt = (
            f"   RESULTS.md ({ref['tasks']} tasks): {ref['accuracy']:.2f} +- {ref['ci95']:.2f}"
            f" {'(intervals overlap)' if inside else '(intervals DISJOINT)'}"
        )
    print(
        f"{name:37s} {ways}-way {shots}-shot {method:13s} {res.accuracy:6.2f} +- {res.ci95:.2f}   "
        f"adapt p50 {np.median(adapt_ms):6.1f} ms, classify {ways * 15} queries p50 {np.median(classify_ms):6.1f} ms"
        f"{ref_txt}",
        flush=True,
    )
    for line in samples:
        print(line, flush=True)
