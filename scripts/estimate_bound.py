"""How well can a support-set report estimate a task's accuracy at all? (issue 37, RESULTS.md "Support-set report").

For one metric model with the centroid head: on ``--fit-tasks`` validation tasks (seed + 1) and ``--tasks`` test
tasks (seed), 5-way 5-shot, each task with 30 images per class beside its support set: the first 15 are the scored
queries (the task's accuracy), the other 15 are unlabeled images of the same classes. Per task, statistics of the
support set alone (the held-out probability of the true class at several temperatures, held-out 0/1 accuracy, the
Fisher ratio of the class means, the smallest class-mean separation) and of the unlabeled images (their mean
highest centroid probability at temperature 0.1). Each set of statistics is mapped to accuracy by least squares on
the validation tasks and scored on the test tasks (mean absolute difference, points; correlation), next to the
constant (validation mean) and an *oracle*: all support statistics fitted on the test tasks themselves, the best a
linear map of them can do on these tasks.

    .venv/bin/python scripts/estimate_bound.py --model tinyimagenet-conv4-sce-nca-directsum --tasks 600 --fit-tasks 300
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import open_shipped
from fewshot.models.heads.transforms import transform_features
from fewshot.models.zoo import load_model

TEMPERATURES = (0.05, 0.1, 0.2, 0.5)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def statistics(support: np.ndarray, labels: np.ndarray, unlabeled: np.ndarray, ways: int) -> dict[str, float]:
    """The support set's statistics and the unlabeled images' confidence, on transformed ``(n, d)`` features."""
    onehot = np.eye(ways)[labels]
    counts, sums = onehot.sum(0), onehot.T @ support
    means = sums / counts[:, None]
    d = ((support[:, None] - means[None]) ** 2).sum(-1)
    without = (sums[labels] - support) / (counts[labels] - 1)[:, None]
    d[np.arange(len(labels)), labels] = ((support - without) ** 2).sum(1)  # leave-one-out, closed form
    row = {f"p_true@{t}": float(_softmax(-d / t)[np.arange(len(labels)), labels].mean()) for t in TEMPERATURES}
    row["loo_01"] = float((d.argmin(1) == labels).mean())
    spread = ((support - means[labels]) ** 2).sum(1).sum() / (len(labels) - ways)
    between = ((means[:, None] - means[None]) ** 2).sum(-1)[np.triu_indices(ways, 1)]
    row["fisher"], row["min_separation"] = float(between.mean() / spread), float(between.min() / spread)
    du = ((unlabeled[:, None] - means[None]) ** 2).sum(-1)
    row["unlabeled_confidence@0.1"] = float(_softmax(-du / 0.1).max(1).mean())
    return row


def tasks(model, method: str, split: str, count: int, seed: int) -> tuple[list[dict[str, float]], np.ndarray]:
    """Per task: its statistics and its accuracy on its 15 scored queries per class."""
    family = open_shipped(model, threads=0)
    adapter = family.adapter(method, shots=5)
    head = adapter.head  # the centroid head: its transform and centering vector
    data = load_dataset(model.card.dataset, split, spec=model.spec)
    sampler = EpisodeSampler(data, 5, 5, 30, seed)
    rows, accuracy = [], []
    for i in range(count):
        ep = sampler.episode(i)
        labels = np.asarray(ep.support_labels)
        query, qlabels = np.asarray(ep.query), np.asarray(ep.query_labels)
        scored = np.concatenate([np.flatnonzero(qlabels == c)[:15] for c in range(5)])
        extra = np.setdiff1d(np.arange(len(query)), scored)
        feats = adapter.extract(model.spec.normalize(data.images[np.concatenate([ep.support, query])]))
        z = transform_features(feats, head.transform, head.center).numpy().astype(np.float64)
        s, q = z[: len(labels)], z[len(labels) :]
        task = adapter.adapt(model.spec.normalize(data.images[ep.support]), torch.as_tensor(labels))
        predicted = task.classify(model.spec.normalize(data.images[query[scored]])).argmax(1).numpy()
        accuracy.append(float((predicted == qlabels[scored]).mean()))
        rows.append(statistics(s, labels, q[extra], 5))
    return rows, np.asarray(accuracy)


def score(fit_x: np.ndarray, fit_y: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares on (fit_x, fit_y), scored on (x, y): mean absolute difference (points), correlation."""
    coef, *_ = np.linalg.lstsq(np.column_stack([fit_x, np.ones(len(fit_x))]), fit_y, rcond=None)
    estimate = np.clip(np.column_stack([x, np.ones(len(x))]) @ coef, 0.0, 1.0)
    return {"mad": round(float(100 * np.abs(estimate - y).mean()), 2), "corr": round(float(np.corrcoef(estimate, y)[0, 1]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyimagenet-conv4-sce-nca-directsum")
    parser.add_argument("--method", default="centroid")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--fit-tasks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    fit_rows, fit_y = tasks(model, args.method, "val", args.fit_tasks, args.seed + 1)
    test_rows, y = tasks(model, args.method, "test", args.tasks, args.seed)
    keys = list(fit_rows[0])
    fx = np.asarray([[r[k] for k in keys] for r in fit_rows])
    tx = np.asarray([[r[k] for k in keys] for r in test_rows])
    support_keys = [k for k in keys if not k.startswith("unlabeled")]
    columns = lambda names: [keys.index(n) for n in names]  # noqa: E731  (a one-line local helper)
    out = {
        "model": args.model,
        "method": args.method,
        "tasks": args.tasks,
        "fit_tasks": args.fit_tasks,
        "seed": args.seed,
        "accuracy": round(float(100 * y.mean()), 2),
        "validation_accuracy": round(float(100 * fit_y.mean()), 2),
        "constant": {"mad": round(float(100 * np.abs(fit_y.mean() - y).mean()), 2)},
        "noise_floor_mad": round(float(100 * 0.8 * np.sqrt(y * (1 - y) / 75).mean()), 2),
    }
    for name in keys:
        out[name] = score(fx[:, columns([name])], fit_y, tx[:, columns([name])], y)
    out["all_support_statistics"] = score(fx[:, columns(support_keys)], fit_y, tx[:, columns(support_keys)], y)
    out["oracle_all_support_statistics_fitted_on_test"] = score(tx[:, columns(support_keys)], y, tx[:, columns(support_keys)], y)
    both = [*support_keys, "unlabeled_confidence@0.1"]
    out["support_and_unlabeled"] = score(fx[:, columns(both)], fit_y, tx[:, columns(both)], y)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
