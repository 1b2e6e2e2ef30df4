"""Accuracy of a shipped inner-loop model against its number of inner steps (issue 33).

With a head that starts at the nearest centroid (``head_init: centroid``), zero steps answer as that
centroid on the model's (meta-trained) features, so the curve says what each step earns. Same seeded tasks
as ``fewshot eval`` (seed, tasks, 15 queries per class), one row per step count, with its 95% interval.
``--alpha``/``--head-alpha`` replace the model's step sizes (plain MAML steps); ``--backbone NAME`` runs the
same loop on a metric model's network before any meta-training (plain fine-tuning from its centroid head).

    python scripts/inner_steps.py --model tinyimagenet-conv4-cxgrad --shots 5 --steps 0 1 2 5 10 --tasks 600
    python scripts/inner_steps.py --model tinyimagenet-conv4-maml --split val --tasks 100 --shots 5 --steps 5 --alpha 1.0
    python scripts/inner_steps.py --backbone tinyimagenet-conv4-sce-nca-directsum --split val --tasks 100 --shots 5 \
        --steps 0 5 --alpha 0.1 --head-alpha 0.1
"""

from __future__ import annotations

import argparse
import json

import torch

from fewshot.models.data import load_dataset
from fewshot.models.evaluation import evaluate
from fewshot.models.inner_loop.engine import InnerLoopAdapter
from fewshot.models.inner_loop.rules import UpdateRule
from fewshot.models.inner_loop.training import MetaTrainConfig, backbone_params, build_learner
from fewshot.models.zoo import load_model


def from_backbone(name: str, adapt_from: int) -> tuple:
    """``(net, rule, params, spec, dataset)`` of ``name``'s network as meta-training starts it (temperature 10)."""
    backbone = load_model(name)
    cfg = MetaTrainConfig(
        method="maml",
        dataset=backbone.card.data["dataset"],
        width=backbone.card.architecture["width"],
        bn_train="support",
        init_backbone=name,
        head_init="centroid",
        adapt_from=adapt_from,
    )
    net, rule = build_learner(cfg, backbone.spec)
    return net, rule, backbone_params(net, backbone, cfg.head_temperature), backbone.spec, cfg.dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a shipped inner-loop model")
    source.add_argument("--backbone", help="a shipped metric model: its network before meta-training")
    parser.add_argument("--adapt-from", type=int, default=3, help="with --backbone: the first adapted block")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--alpha", type=float, help="conv step size (default: the model's rule; plain steps)")
    parser.add_argument("--head-alpha", type=float, help="head step size (default: --alpha)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 5, 10])
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = load_model(args.model)
        loop = model.card.family_blocks["inner_loop"]
        net, rule, params, spec, dataset = model.net, model.rule, model.meta_params, model.spec, model.card.data["dataset"]
        bn_mode, head_init = loop["bn_mode"], loop.get("head_init", "learned")
    else:
        net, rule, params, spec, dataset = from_backbone(args.backbone, args.adapt_from)
        bn_mode, head_init = "support", "centroid"
    data = load_dataset(dataset, args.split)
    for steps in args.steps:
        if args.alpha is not None:
            rule = UpdateRule(net, steps, args.alpha, args.head_alpha or args.alpha)
        adapter = InnerLoopAdapter(net, rule, params, steps, bn_mode, head_init=head_init)
        res = evaluate(adapter, data, spec.normalize, args.ways, args.shots, 15, args.tasks, args.seed)
        print(
            json.dumps(
                {
                    "model": args.model or args.backbone,
                    "split": args.split,
                    "ways": args.ways,
                    "shots": args.shots,
                    "inner_steps": steps,
                    "alpha": args.alpha,
                    "head_alpha": args.head_alpha,
                    "tasks": args.tasks,
                    "seed": args.seed,
                    "accuracy": round(res.accuracy, 2),
                    "ci95": round(res.ci95, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
