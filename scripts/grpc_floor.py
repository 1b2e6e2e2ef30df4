"""The floor under a served Classify: what gRPC itself costs for the same bytes, with none of the service's work.

A ``grpc.aio`` server in a child process (one thread of Python, pinned to the last core, as ``fewshot bench --compare
--pin`` pins ``fewshot serve``) answers every call with the serialised ``ClassifyResponse`` of ``--queries``
predictions over 5 classes; the client (this process, on the other cores, the synchronous ``grpcio`` channel the SDK
uses) sends the serialised ``ClassifyRequest`` of ``--queries`` Omniglot test images as PNG, built by the SDK's own
``classify_request``. Prints one JSON line per query count: the request and response sizes and the round trip's
median, p10 and p90 over ``--calls`` calls after ``--warmup`` calls. Read it beside ``fewshot bench --compare --pin``:
the served overhead minus this floor is the service's own per-call work (decoding, the head, the response, the
worker hop)::

    .venv/bin/python scripts/grpc_floor.py --queries 1 --queries 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time

import grpc
import numpy as np
import torch

METHOD = "/floor.Floor/Echo"


def _serve(port: int, response: bytes, core: int, ready: mp.synchronize.Event) -> None:
    os.sched_setaffinity(0, {core})

    async def main() -> None:
        server = grpc.aio.server()

        async def echo(_raw: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            return response

        handler = grpc.method_handlers_generic_handler("floor.Floor", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def floor(queries: int, calls: int, warmup: int) -> dict[str, float | int]:
    """The round trip of one query count (module docstring)."""
    from fewshot.models.data import load_dataset
    from fewshot.models.preprocess import encode_png
    from fewshot.server.requests import classify_response
    from fewshot.tools.launch import free_port
    from fewshot_client import messages

    data = load_dataset("omniglot", "test")
    request = messages.classify_request("t" * 32, [encode_png(data.images[i]) for i in range(queries)], 1, False, None, None, 0)
    labels = [f"class-{c}" for c in range(5)]
    response = classify_response(torch.randn(queries, 5, generator=torch.Generator().manual_seed(0)), labels, 1, None, None)
    cores = sorted(os.sched_getaffinity(0))
    port, ready = free_port(), mp.Event()
    child = mp.Process(target=_serve, args=(port, response.SerializeToString(), cores[-1], ready), daemon=True)
    child.start()
    try:
        if not ready.wait(60):
            raise SystemExit("grpc_floor: the echo server did not start in 60 s")
        os.sched_setaffinity(0, set(cores[:-1]) or set(cores))
        raw = request.SerializeToString()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)
            for _ in range(warmup):
                call(raw)
            ms = []
            for _ in range(calls):
                start = time.perf_counter()
                call(raw)
                ms.append(1e3 * (time.perf_counter() - start))
    finally:
        child.terminate()
        child.join()
        os.sched_setaffinity(0, set(cores))
    return {
        "queries": queries,
        "request_bytes": len(raw),
        "response_bytes": response.ByteSize(),
        "calls": calls,
        "p50_ms": round(float(np.median(ms)), 3),
        "p10_ms": round(float(np.percentile(ms, 10)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, action="append", help="query images per call (repeatable; default 1 and 64)")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    for q in args.queries or [1, 64]:
        if not 1 <= q <= 1000:
            parser.error(f"--queries {q}: 1 to 1000")
        print(json.dumps(floor(q, args.calls, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
