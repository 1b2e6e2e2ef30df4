"""Resident memory of a real ``fewshot serve`` process under the two loads of issue 34, sampled every 100 ms.

``streams``: C clients at once each open an AdaptStream of K chunks, each chunk one B MB image (random bytes:
the stream is refused before anything is decoded), the first naming the model; every stream is refused with
RESOURCE_EXHAUSTED. Prints resident memory at start, its peak, and 10 s after the last stream ended::

    python scripts/memory_probe.py streams --clients 6 --chunks 40 --chunk-mb 8.3

``adapt``: C clients adapt W-way 5-shot centroid tasks of raw uint8 Tiny ImageNet images (and classify one
query each) until T tasks, with ``--cache-mb M``; prints the resident memory after warm-up, its peak over the
load and its level 3 s after, against the bound of docs/serving.md::

    python scripts/memory_probe.py adapt --clients 3 --ways 20 --tasks 5000 --cache-mb 256

Server flags can be added after ``--``. One JSON line per run on stdout (``--json``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from fewshot.tools.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the memory probes are test fixtures (tests/fixtures/), not in the installed package
from fixtures.memory import ResidentMemory as Sampler  # noqa: E402  (after the path)
from fixtures.memory import adapt_load  # noqa: E402  (after the path)
from fixtures.memory import resident_mb as rss_mb  # noqa: E402  (after the path)


def streams(target: str, pid: int, clients: int, chunks: int, chunk_mb: float, model: str) -> dict:
    from fewshot_proto import fewshot_pb2 as pb
    from fewshot_proto import fewshot_pb2_grpc as pb_grpc

    blob = np.random.default_rng(0).integers(0, 256, int(chunk_mb * 2**20), dtype=np.uint8).tobytes()

    def stream(i: int) -> str:
        def chunks_of():
            for k in range(chunks):
                yield pb.AdaptChunk(model=model if k == 0 else "", support=[pb.LabelledImage(image=pb.Image(encoded=blob), label=f"c{k}")])

        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            try:
                pb_grpc.FewShotStub(channel).AdaptStream(chunks_of(), timeout=120)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name

    start = rss_mb(pid)
    with Sampler(pid) as sampler, ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(stream, range(clients)))
        peak = sampler.peak
    time.sleep(10)
    return {
        "load": "streams",
        "clients": clients,
        "chunks": chunks,
        "chunk_mb": chunk_mb,
        "codes": codes,
        "rss_start_mb": round(start, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_idle_10s_mb": round(rss_mb(pid), 1),
    }


def adapt(target: str, pid: int, clients: int, ways: int, tasks: int, model: str, cache_mb: int, warm: int = 60) -> dict:
    from fewshot.models.data import load_dataset
    from fewshot.models.episodes import EpisodeSampler
    from fewshot_proto import fewshot_pb2 as pb

    test = load_dataset("tinyimagenet", "test")
    sampler = EpisodeSampler(test, ways, 5, 1, seed=0)

    def raw(i: int) -> pb.Image:
        a = test.images[i]
        a = a.transpose(1, 2, 0) if a.ndim == 3 and a.shape[0] in (1, 3) else a
        a = np.ascontiguousarray(a, dtype=np.uint8)
        return pb.Image(tensor=pb.RawTensor(shape=list(a.shape), dtype="uint8", data=a.tobytes()))

    supports = []
    for e in range(8):
        ep = sampler.episode(e)
        supports.append(
            ([pb.LabelledImage(image=raw(j), label=f"c{c}") for j, c in zip(ep.support, ep.support_labels)], [raw(ep.query[0])])
        )
    load = adapt_load(target, pid, model, supports, clients, warm, tasks)
    time.sleep(3)
    return {
        "load": "adapt",
        "clients": clients,
        "ways": ways,
        "tasks": tasks,
        "cache_mb": cache_mb,
        **{k: round(v, 1) for k, v in load.items()},
        "rss_3s_after_mb": round(rss_mb(pid), 1),
        "peak_growth_mb": round(load["rss_peak_mb"] - load["rss_after_warmup_mb"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=("streams", "adapt"))
    parser.add_argument("--models", default=None, help="bundle directory (default: exported to a temporary directory)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--chunk-mb", type=float, default=8.3)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--cache-mb", type=int, default=256)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.server_args = argv[cut + 1 :]  # more `fewshot serve` flags, after --
    model = args.model or ("omniglot-conv4-directsum" if args.load == "streams" else "tinyimagenet-conv4-sce-nca-directsum")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "bundles"
        if not args.models:
            from fewshot.cli import main as fewshot_main

            if fewshot_main(["export", "--model", model, "--out", str(models)]):
                sys.exit("export failed")
        extra = ["--cache-mb", str(args.cache_mb)] if args.load == "adapt" else []
        with ServerProcess(models, Path(tmp) / "state", "--warmup-tasks", "1", *extra, *args.server_args) as proc:
            time.sleep(1)
            if args.load == "streams":
                out = streams(proc.target, proc.pid, args.clients, args.chunks, args.chunk_mb, model)
            else:
                out = adapt(proc.target, proc.pid, args.clients, args.ways, args.tasks, model, args.cache_mb)
    out["server_args"] = args.server_args
    out["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
