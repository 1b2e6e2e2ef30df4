"""Tasks moved between deployments (issue 37, RESULTS.md "Moving tasks"): for every shipped model, ``--tasks`` seeded
5-way 5-shot test tasks (15 queries per class) are adapted on a ``fewshot serve`` with a SQLite store, exported
(ExportTask), imported (ImportTask) into a second ``fewshot serve`` with a PostgreSQL store (a real server, started
here as in the tests), and classified on both: the rows count tasks whose labels and every query's probabilities are
identical (bit for bit), and give the largest absolute difference seen. Then the three bad blobs (a corrupted one, one
of a model version not loaded, one of a newer format) are refused, with their status and message. One JSON line
per model, then one for the refusals.

    .venv/bin/python scripts/task_moves_check.py --tasks 600 --seed 0 --out task_moves.jsonl
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from fewshot.export.bundle import export_model
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.zoo import load_model, shipped_models
from fewshot.server.task_blob import MAGIC
from fewshot.tools.demo import encode_episode
from fewshot.tools.launch import ServerProcess
from fewshot_client import FewShotClient, FewShotError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # PostgresServer is a test fixture, not in the installed package
from fixtures.postgres import PostgresServer

SERVE = ("--threads", "1", "--workers", "2", "--warmup-tasks", "0")


def _scores(predictions: list) -> np.ndarray:
    return np.array([[p.scores[k] for k in sorted(p.scores)] for p in predictions], dtype=np.float64)


def _repack(blob: bytes, **changes: object) -> bytes:
    start = len(MAGIC) + 4
    (size,) = struct.unpack(">I", blob[len(MAGIC) : start])
    header = json.loads(blob[start : start + size]) | changes
    text = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + blob[start + size :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", help="default: every shipped model")
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as pg:
        root = Path(tmp)
        for name in args.model or shipped_models():
            export_model(name, root / "bundles", log=lambda *_: None)
        with (
            ServerProcess(root / "bundles", root / "sqlite", *SERVE) as source_proc,
            ServerProcess(root / "bundles", root / "pg-state", *SERVE, "--store", pg.create_database("moves")) as target_proc,
            FewShotClient(source_proc.target, timeout=300.0) as source,
            FewShotClient(target_proc.target, timeout=300.0) as target,
        ):
            blob = b""
            for name in args.model or shipped_models():
                data = load_dataset(load_model(name).card.dataset, "test")
                sampler = EpisodeSampler(data, 5, 5, 15, args.seed)
                identical, worst = 0, 0.0
                for i in range(args.tasks):
                    ep = encode_episode(data, sampler.episode(i))
                    task = source.adapt(ep.support, ep.support_labels, name)
                    blob = source.export_task(task.id)
                    moved = target.import_task(blob)
                    a, b = _scores(task.classify(ep.queries)), _scores(moved.classify(ep.queries))
                    worst = max(worst, float(np.abs(a - b).max()))
                    identical += moved.labels == task.labels and np.array_equal(a, b)
                    task.delete()
                    moved.delete()
                line = {"model": name, "tasks": args.tasks, "seed": args.seed, "identical": identical, "max_abs_diff": worst}
                print(json.dumps(line), flush=True)
                lines.append(line)
            refusals = {}
            corrupt = bytearray(blob)
            corrupt[-100] ^= 0xFF
            for what, bad in (
                ("corrupted", bytes(corrupt)),
                ("model version not loaded", _repack(blob, model_version="7", model_digest="f" * 64)),
                ("newer format", _repack(blob, format=99)),
            ):
                try:
                    target.import_task(bad)
                    refusals[what] = "accepted"
                except FewShotError as exc:
                    refusals[what] = f"{exc.code.name}: {exc.details}"
            line = {"refusals": refusals}
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        args.out.write_text("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    main()
