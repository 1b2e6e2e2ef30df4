"""Open-set evaluation (issue 16, first step): episodes whose queries include classes nobody enrolled.

The PEELER / SnaTCHer protocol: an N-way K-shot task, Q queries of each of its N classes, plus Q
queries of each of N further test classes that are not in the support set. A score says how well a
query fits its best class; the known-vs-unknown AUROC of that score is reported beside the closed-set
accuracy on the known queries. The score here is the maximum class probability (what every method's
``classify`` gives); per-method logit and energy scores come with the rejection API.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import rankdata

from fewshot.errors import ConfigError
from fewshot.models.data import ImageSet
from fewshot.models.episodes import Episode, EpisodeSampler


@dataclass(frozen=True)
class OpenEpisode:
    """A closed-set :class:`Episode` and ``unknown``: ``(N*Q,)`` query indices of N other classes."""

    known: Episode
    unknown_classes: np.ndarray
    unknown: np.ndarray


class OpenSetSampler:
    """Seeded open-set episodes: the known part is ``EpisodeSampler(dataset, ways, shots, queries,
    seed).episode(i)`` exactly; the unknown classes and their queries come from a separate stream of
    ``(seed, i)``, drawn from the classes the known part did not use."""

    def __init__(self, dataset: ImageSet, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        self.closed = EpisodeSampler(dataset, ways, shots, queries, seed)
        if queries < 1:
            raise ConfigError("open-set episodes need at least 1 query per class")
        self.eligible_unknown = np.array([c for c, idx in enumerate(self.closed.by_class) if len(idx) >= queries])
        if len(self.eligible_unknown) < 2 * ways:
            raise ConfigError(f"open-set {ways}-way episodes need {2 * ways} classes with {queries} images; this dataset "
                              f"has {len(self.eligible_unknown)}")
        self.ways, self.queries, self.seed = ways, queries, seed

    def episode(self, index: int) -> OpenEpisode:
        known = self.closed.episode(index)
        rng = np.random.default_rng([self.seed, index, 1])
        others = np.setdiff1d(self.eligible_unknown, known.classes)
        classes = rng.choice(others, size=self.ways, replace=False)
        unknown = np.concatenate([rng.choice(self.closed.by_class[c], size=self.queries, replace=False) for c in classes])
        return OpenEpisode(known, classes, unknown)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of a known query > score of an unknown one) + 0.5 P(tie): the area under the ROC curve of
    "known" vs "unknown" (Mann-Whitney U with mid-ranks for ties)."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        raise ValueError("AUROC needs at least one known and one unknown score")
    ranks = rankdata(np.concatenate([known, unknown]))
    u = ranks[: len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u / (len(known) * len(unknown)))


@dataclass
class OpenSetResult:
    """Per-task means in percent with their 95% intervals (``1.96 * std / sqrt(T)``)."""

    accuracy: float
    accuracy_ci95: float
    auroc: float
    auroc_ci95: float
    tasks: int
    seconds: float


def _mean_ci(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64) * 100.0
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def evaluate_open_set(adapter: object, dataset: ImageSet, normalize: Callable[[np.ndarray], torch.Tensor], ways: int,
                      shots: int, queries: int = 15, tasks: int = 600, seed: int = 0) -> OpenSetResult:
    """``tasks`` open-set episodes through ``adapter`` (as the server runs it): closed-set accuracy on the
    known queries and the AUROC of the maximum probability, known vs unknown queries. Known and unknown
    queries are classified in one call, as one Classify of a mixed batch."""
    sampler = OpenSetSampler(dataset, ways, shots, queries, seed)
    start, accuracies, aurocs = time.perf_counter(), [], []
    for i in range(tasks):
        ep = sampler.episode(i)
        state = adapter.adapt(normalize(dataset.images[ep.known.support]), torch.as_tensor(ep.known.support_labels))
        probs = state.classify(normalize(dataset.images[np.concatenate([ep.known.query, ep.unknown])])).cpu().numpy()
        n = len(ep.known.query)
        accuracies.append(float((probs[:n].argmax(1) == ep.known.query_labels).mean()))
        score = probs.max(1)
        aurocs.append(auroc(score[:n], score[n:]))
    (acc, acc_ci), (area, area_ci) = _mean_ci(accuracies), _mean_ci(aurocs)
    return OpenSetResult(acc, acc_ci, area, area_ci, tasks, time.perf_counter() - start)
