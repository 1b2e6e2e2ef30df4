"""Resident memory and time of ONNX Runtime backbone runs over mixed batch sizes, by run size.

Why the server runs ONNX Runtime in chunks of 32 images on CPU (``fewshot.models.features``): the CPU
arena keeps the largest activations it ever held, so one 256-image run of a 64x64 Conv-4 holds
~1 GB for the rest of the process. Each variant runs in its own process (resident memory is per
process), side by side in one invocation::

    python scripts/arena_memory.py --bundle bundles/tinyimagenet-conv4-sce-nca-directsum --runs 150 --seed 0

prints, per variant, resident memory after 10, 50, 100 and all runs, and the wall time of all runs.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

VARIANTS = {
    "one run, arena": (0, True),
    "one run, no arena": (0, False),
    "chunks of 64, arena": (64, True),
    "chunks of 32, arena": (32, True),
}
BATCHES = (1, 5, 15, 25, 40, 75, 120, 200, 256)


def _rss_mb() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def _one(bundle: str, chunk: int, arena: bool, runs: int, seed: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level, opts.enable_cpu_mem_arena = 1, 3, arena
    session = ort.InferenceSession(f"{bundle}/backbone.onnx", opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    rng, data = random.Random(seed), np.random.default_rng(seed)
    marks, start = {}, time.perf_counter()
    for i in range(runs):
        x = data.random((rng.choice(BATCHES), *inp.shape[1:]), dtype=np.float32)
        step = chunk or len(x)
        np.concatenate([session.run(None, {inp.name: x[j : j + step]})[0] for j in range(0, len(x), step)])
        if i + 1 in (10, 50, 100, runs):
            marks[i + 1] = round(_rss_mb())
    return {"rss_mb_after_runs": marks, "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="bundles/tinyimagenet-conv4-sce-nca-directsum")
    p.add_argument("--runs", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        chunk, arena = VARIANTS[args.variant]
        print(json.dumps(_one(args.bundle, chunk, arena, args.runs, args.seed)))
        return
    print(f"{args.runs} runs of seeded batch sizes {BATCHES}, one thread, {args.bundle}")
    for name in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--bundle", args.bundle, "--runs", str(args.runs), "--seed", str(args.seed), "--variant", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = json.loads(out)
        print(f"{name:22s} resident MB after runs {row['rss_mb_after_runs']}  {row['seconds']} s")


if __name__ == "__main__":
    main()
