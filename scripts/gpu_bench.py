"""The GPU figures of BENCHMARKS.md ("On a GPU"), in one JSON file; ``scripts/gpu-bench.sh`` runs it (CPU: ``--device cpu``).

Sections, each timed on ``--device`` with the clock waiting for the device:

* ``onnxruntime``: the backbone of each flagship metric model and the network of each inner-loop model, 64 images
  per call, with every execution provider this ONNX Runtime has (CUDA's where it is installed), images/s;
* ``adapt``: the inner loop of every shipped inner-loop model against the plain reference loop
  (``fewshot bench --compare --sections adapt`` on the device), and the same loop replayed from a CUDA graph
  (:mod:`fewshot.models.inner_loop.graphs`, CUDA only): p50 and the largest difference of its adapted weights
  from the eager loop's;
* ``many``: Adapt of 1, 8, 32 and 128 tasks one by one against one stacked inner loop, and 16 one-query
  Classify calls of 16 tasks one by one against one merged call (engine only).

A section that fails records its error and the others still run. ``--quick`` cuts repeats and task counts (what
the CPU test runs).

    .venv/bin/python scripts/gpu_bench.py --device cuda --bundles bundles --out gpu-bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.export.loader import open_bundle
from fewshot.export.registry import Registry
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.inner_loop.family import InnerLoopFamily
from fewshot.models.runtime import onnx_session
from fewshot.tools.compare import clock, compare_adapt, compare_many_tasks


def usable_bundles(root: Path) -> tuple[Path, dict[str, str]]:
    """A folder of links to the bundles of ``root`` whose test data loads here (a device machine gets only what
    travels with the tree: ``FEWSHOT_DATA`` pointing at a carried copy), and why each other one is left out."""
    from fewshot.errors import FewShotError

    usable = Path(tempfile.mkdtemp(prefix="gpu-bench-bundles-"))
    skipped = {}
    for name, bundle in sorted(Registry.load(root).bundles.items()):
        try:
            load_dataset(bundle.manifest["data"]["dataset"], "test")
        except FewShotError as exc:
            skipped[name] = str(exc)
            print(f"{name}: left out ({exc})", flush=True)
            continue
        (usable / name).symlink_to(bundle.path.resolve(), target_is_directory=True)
    return usable, skipped


def onnxruntime_rows(bundles: Path, repeats: int, now: Callable[[], float]) -> list[dict[str, Any]]:
    """Images/s of each bundle's served graph at 64 images per call, per execution provider."""
    import onnxruntime as ort

    from fewshot.models.inner_loop.onnx_network import network_inputs

    rows = []
    registry = Registry.load(bundles)
    for name, bundle in sorted(registry.bundles.items()):
        model = open_bundle(bundle, "cpu")
        data = load_dataset(model.manifest["data"]["dataset"], "test")
        images = np.ascontiguousarray(model.spec.normalize(data.images[:64]).numpy())
        if isinstance(model, InnerLoopFamily):
            ep = EpisodeSampler(data, 5, 5, 15, 0).episode(0)
            state = model.adapter().adapter.adapt(model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
            feeds = {k: v.cpu().numpy() for k, v in network_inputs(state.net, *state.weights(), state.step).items()}
            part = "network"
        else:
            feeds, part = {}, "backbone"
        feeds["images"] = images
        for provider in ort.get_available_providers():
            if provider not in ("CUDAExecutionProvider", "CPUExecutionProvider"):
                continue
            device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
            session = onnx_session(str(bundle.file(f"{part}.onnx")), device)
            for _ in range(3):
                session.run(None, feeds)
            ms = []
            for _ in range(repeats):
                start = now()
                session.run(None, feeds)
                ms.append(1e3 * (now() - start))
            rows.append(
                {
                    "model": name,
                    "part": part,
                    "provider": provider,
                    "p50_ms": round(float(np.median(ms)), 2),
                    "images_per_s": round(64e3 / float(np.median(ms)), 1),
                }
            )
            print(f"{name:37s} {part}.onnx on {provider}: 64 images p50 {rows[-1]['p50_ms']} ms", flush=True)
    return rows


def graphed_rows(bundles: Path, device: str, repeats: int, now: Callable[[], float]) -> list[dict[str, Any]]:
    """Eager vs CUDA-graph inner loop per shipped inner-loop model (CUDA only)."""
    from fewshot.models.inner_loop.graphs import GraphedAdapter

    rows = []
    registry = Registry.load(bundles)
    for name, bundle in sorted(registry.bundles.items()):
        model = open_bundle(bundle, device)
        if not isinstance(model, InnerLoopFamily):
            continue
        data = load_dataset(model.manifest["data"]["dataset"], "test")
        eager = model.adapter().adapter
        graphed = GraphedAdapter(eager)
        sampler = EpisodeSampler(data, 5, 5, 15, 0)
        times: dict[str, list[float]] = {"eager": [], "graph": []}
        worst = 0.0
        for i in range(3 + repeats):
            ep = sampler.episode(i)
            xs = model.spec.normalize(data.images[ep.support]).to(device)
            ys = torch.as_tensor(ep.support_labels).to(device)
            start = now()
            a = eager.adapt(xs, ys)
            mid = now()
            b = graphed.adapt(xs, ys)
            end = now()
            if i >= 3:
                times["eager"].append(1e3 * (mid - start))
                times["graph"].append(1e3 * (end - mid))
            worst = max(worst, max(float((a.params[k].float() - b.params[k].float()).abs().max()) for k in a.params))
        e, g = (float(np.median(times[k])) for k in ("eager", "graph"))
        rows.append(
            {
                "model": name,
                "eager_p50_ms": round(e, 2),
                "graph_p50_ms": round(g, 2),
                "speedup": round(e / g, 2),
                "max_abs_weight_diff": worst,
            }
        )
        print(f"{name:37s} Adapt eager p50 {e:.2f} ms, CUDA graph {g:.2f} ms ({e / g:.2f}x), weights within {worst:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--bundles", default="bundles")
    parser.add_argument("--out", default="gpu-bench.json")
    parser.add_argument("--quick", action="store_true", help="few repeats and tasks (the CPU test)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: --device cuda, but torch sees no CUDA device (use --device cpu to check the script)")
    repeats = 3 if args.quick else 20
    adapt_tasks = (1, 8) if args.quick else (1, 8, 32, 128)
    now = clock(args.device)
    bundles, skipped = usable_bundles(Path(args.bundles))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "skipped_models": skipped,
        "sections": {},
    }
    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "onnxruntime": lambda: onnxruntime_rows(bundles, repeats, now),
        "adapt": lambda: compare_adapt(bundles, repeats=repeats, warmup=2, device=args.device),
        "many": lambda: compare_many_tasks(bundles, adapt_tasks=adapt_tasks, device=args.device, served_rows=False),
    }
    if args.device == "cuda":
        sections["graphs"] = lambda: graphed_rows(bundles, args.device, repeats, now)
    else:
        report["sections"]["graphs"] = {"skipped": "CUDA graphs need a CUDA device"}
    for name, run in sections.items():
        started = time.perf_counter()
        try:
            report["sections"][name] = {"rows": run(), "seconds": round(time.perf_counter() - started, 1)}
        except Exception as exc:  # a failed section is reported; the others still run
            report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            print(f"section {name} failed: {exc}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
