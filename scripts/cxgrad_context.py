"""What CxGrad's context carries on real tasks (issue 33): per adapted conv layer, the scale gamma = g_phi(nu)
at the end of each task's inner loop (its mean and spread across tasks), the norm of the context nu, and the
weight norms gamma starts from (the meta-learned ``||W_l||``).

    python scripts/cxgrad_context.py --model tinyimagenet-conv4-cxgrad --shots 5 --tasks 20
"""

from __future__ import annotations

import argparse
import json

import torch

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.inner_loop.engine import inner_loop
from fewshot.models.zoo import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    loop = model.card.family_blocks["inner_loop"]
    rule, net, params = model.rule, model.net, model.meta_params
    data = load_dataset(model.card.data["dataset"], "test")
    sampler = EpisodeSampler(data, args.ways, args.shots, 0, seed=args.seed)
    gammas, nus = [], []
    for i in range(args.tasks):
        ep = sampler.episode(i)
        x, y = model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels)
        learner = net
        if net.adapt_from:
            learner, x = net.tail(), net.stem(params, x)
        ad = inner_loop(learner, rule, params, x, y, loop["steps"], head_init=loop.get("head_init", "learned"))
        nu = ad.ctx["nu"].detach()
        nus.append(float(nu.norm()))
        gammas.append(rule.g_phi(nu).detach())
    g = torch.stack(gammas)
    print(
        json.dumps(
            {
                "model": args.model,
                "ways": args.ways,
                "shots": args.shots,
                "tasks": args.tasks,
                "seed": args.seed,
                "layers": rule.conv_names,
                "weight_norms": [round(float(params[n].norm()), 4) for n in rule.conv_names],
                "gamma_mean": [round(float(v), 4) for v in g.mean(0)],
                "gamma_spread": [float(f"{float(v):.3g}") for v in (g.max(0).values - g.min(0).values)],
                "nu_norm_max": float(f"{max(nus):.3g}"),
            }
        )
    )


if __name__ == "__main__":
    main()
