"""Where a served Classify's time goes: client-observed p50 against the server's own logged time for the
same calls (``"ms"`` of its per-call log line), for 64 PNG queries to omniglot-conv4-directsum.
Usage: python scripts/classify_split.py [--queries 64] [--calls 40]   (needs the bundle in bundles/)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png
from fewshot.tools.launch import ServerProcess
from fewshot_client import FewShotClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--model", default="omniglot-conv4-directsum")
    parser.add_argument("--bundles", default="bundles")
    args = parser.parse_args()
    data = load_dataset("omniglot" if args.model.startswith("omniglot") else "tinyimagenet", "test")
    ep = EpisodeSampler(data, 5, 5, 15, 0).episode(0)
    with tempfile.TemporaryDirectory() as state:
        log = Path(state) / "serve.log"
        with ServerProcess(Path(args.bundles), Path(state), log=log) as server, FewShotClient(server.target) as client:
            task = client.adapt([encode_png(data.images[i]) for i in ep.support], [str(c) for c in ep.support_labels], model=args.model)
            queries = [encode_png(data.images[i]) for i in range(args.queries)]
            for _ in range(5):
                task.classify(queries)
            ms = []
            for _ in range(args.calls):
                start = time.perf_counter()
                task.classify(queries)
                ms.append(1e3 * (time.perf_counter() - start))
        served = [json.loads(line)["ms"] for line in log.read_text().splitlines() if line.startswith("{") and '"rpc": "Classify"' in line][
            -args.calls :
        ]
    print(
        f"{args.model}, {args.queries} PNG queries, {args.calls} calls: client p50 {np.median(ms):.2f} ms, "
        f"server-logged p50 {np.median(served):.2f} ms ({100 * np.median(served) / np.median(ms):.0f}% of the call)"
    )


if __name__ == "__main__":
    main()
