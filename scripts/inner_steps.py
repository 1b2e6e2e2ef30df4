"""Accuracy of a shipped inner-loop model against its number of inner steps (issue 33).

With a head that starts at the nearest centroid (``head_init: centroid``), zero steps answer as that
centroid on the model's (meta-trained) features, so the curve says what each step earns. Same seeded test
tasks as ``fewshot eval`` (seed, tasks, 15 queries per class), one row per step count, with its 95% interval.

    python scripts/inner_steps.py --model tinyimagenet-conv4-cxgrad --shots 5 --steps 0 1 2 5 10 --tasks 600
"""

from __future__ import annotations

import argparse
import json

import torch

from fewshot.models.data import load_dataset
from fewshot.models.evaluation import evaluate
from fewshot.models.meta.inner_loop import InnerLoopAdapter
from fewshot.models.zoo import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 5, 10])
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    loop = model.card.family_blocks["inner_loop"]
    data = load_dataset(model.card.data["dataset"], "test")
    for steps in args.steps:
        adapter = InnerLoopAdapter(model.net, model.rule, model.meta_params, steps, loop["bn_mode"],
                                   head_init=loop.get("head_init", "learned"))
        res = evaluate(adapter, data, model.spec.normalize, args.ways, args.shots, 15, args.tasks, args.seed)
        print(json.dumps({"model": args.model, "ways": args.ways, "shots": args.shots, "inner_steps": steps,
                          "tasks": args.tasks, "seed": args.seed, "accuracy": round(res.accuracy, 2),
                          "ci95": round(res.ci95, 2)}), flush=True)


if __name__ == "__main__":
    main()
