"""The ``fewshot`` command: ``train``, ``eval``, ``package`` (and later ``export``, ``serve``, ``bench``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _add_train(sub: argparse._SubParsersAction) -> None:
    from fewshot.models.training import TrainConfig

    p = sub.add_parser("train", help="train a backbone (supervised, direct-sum paper losses)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            p.add_argument(flag, type=kind, default=default)
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _run_train(args: argparse.Namespace) -> None:
    from fewshot.models.training import TrainConfig, train_supervised

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    best = train_supervised(cfg, Path(args.out), resume=args.resume, device=args.device)
    print(f"best checkpoint: {best}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewshot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    args = parser.parse_args(argv)
    try:
        {"train": _run_train}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"fewshot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
