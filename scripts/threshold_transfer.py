"""Does a known-query threshold calibrated on validation classes transfer to test classes? (RESULTS.md, open set)

Nearest centroid on a shipped metric model's features, N-way 1-shot open-set episodes (known queries plus
queries of N unseen classes, as ``fewshot eval --open-set``): the threshold that accepts ``--accept`` of the
known validation queries, applied to test episodes, for the raw score ``-min_c ||q - m_c||^2`` and for that
score divided by the task's mean squared distance between prototypes (a per-task scale). Prints the
acceptance of known and the rejection of unknown test queries for each.

    python scripts/threshold_transfer.py --model omniglot-conv4-directsum --tasks 300
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fewshot.models.data import load_dataset
from fewshot.models.family import open_shipped
from fewshot.models.heads.transforms import transform_features
from fewshot.models.openset import OpenSetSampler
from fewshot.models.zoo import load_model


def scores(model, split: str, ways: int, tasks: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{score name: (known scores, unknown scores)}`` pooled over ``tasks`` episodes of ``split``."""
    data = load_dataset(model.manifest["data"]["dataset"], split)
    feats = torch.cat([model.extract(model.spec.normalize(data.images[i : i + 512])) for i in range(0, len(data.images), 512)])
    feats = transform_features(feats, model.manifest["heads"]["centroid"]["transform"], model.center)
    sampler = OpenSetSampler(data, ways, 1, 15, seed)
    out: dict[str, tuple[list, list]] = {"raw": ([], []), "per-task scale": ([], [])}
    for i in range(tasks):
        ep = sampler.episode(i)
        protos, n = feats[ep.known.support], len(ep.known.query)
        q = feats[np.concatenate([ep.known.query, ep.unknown])]
        score = -((q[:, None] - protos[None]) ** 2).sum(-1).min(1).values
        pairwise = ((protos[:, None] - protos[None]) ** 2).sum(-1)
        scale = pairwise[~torch.eye(ways, dtype=torch.bool)].mean()
        for name, s in (("raw", score), ("per-task scale", score / scale)):
            out[name][0].append(s[:n].numpy())
            out[name][1].append(s[n:].numpy())
    return {k: (np.concatenate(a), np.concatenate(b)) for k, (a, b) in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="omniglot-conv4-directsum")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--tasks", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accept", type=float, default=0.95)
    args = p.parse_args()
    torch.set_num_threads(2)
    model = open_shipped(load_model(args.model))
    val, test = (scores(model, split, args.ways, args.tasks, args.seed) for split in ("val", "test"))
    for name in val:
        threshold = np.quantile(val[name][0], 1 - args.accept)
        known, unknown = test[name]
        print(
            f"{name}: test known accepted {100 * (known >= threshold).mean():.1f}%, unknown rejected "
            f"{100 * (unknown < threshold).mean():.1f}% (validation known accepted {100 * args.accept:.0f}%)"
        )


if __name__ == "__main__":
    main()
