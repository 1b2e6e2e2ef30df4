"""Open-set evaluation (issue 16, first step): episodes whose queries include classes nobody enrolled.

The PEELER / SnaTCHer protocol: an N-way K-shot task, Q queries of each of its N classes, plus Q
queries of each of N further test classes that are not in the support set. A score says how well a
query fits its best class; the known-vs-unknown AUROC of that score is reported beside the closed-set
accuracy on the known queries. :func:`calibrate` chooses a method's temperature, score and thresholds
on validation episodes (:mod:`fewshot.models.calibration`); :func:`evaluate_open_set` measures them on
test episodes (``fewshot eval --open-set``), through the same task objects the server classifies with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm import tqdm

from fewshot.errors import ConfigError
from fewshot.models.calibration import (
    DEFAULT_ACCEPTANCE,
    SCORES,
    UNCALIBRATED,
    OpenSetCalibration,
    acceptance_thresholds,
    expected_calibration_error,
    fit_temperature,
)
from fewshot.models.data import ImageSet
from fewshot.models.episodes import Episode, EpisodeSampler

if TYPE_CHECKING:
    from fewshot.models.family import Adapter


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
            raise ConfigError(
                f"open-set {ways}-way episodes need {2 * ways} classes with {queries} images; this dataset has {len(self.eligible_unknown)}"
            )
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
class OpenScores:
    """One open-set episode's calibrated logits: ``known (n, N)`` with their classes ``labels (n,)``, and
    ``unknown (m, N)`` (queries of classes outside the support set)."""

    known: torch.Tensor
    labels: np.ndarray
    unknown: torch.Tensor


def open_episodes(
    adapter: Adapter, inputs: Callable[[np.ndarray], torch.Tensor], sampler: OpenSetSampler, tasks: int, progress: bool = False
) -> Iterator[OpenScores]:
    """``tasks`` episodes of ``sampler`` through ``adapter`` (as the server runs it): the support set
    adapted, then known and unknown queries classified in **one** call, as one Classify of a mixed
    batch (which matters for transductive heads). ``inputs(indices)`` gives the adapter's inputs:
    normalised images, or precomputed features for a metric head (batch-invariant, so the same)."""
    for i in tqdm(range(tasks), desc="open-set tasks", disable=not progress, leave=False):
        ep = sampler.episode(i)
        task = adapter.adapt(inputs(ep.known.support), torch.as_tensor(ep.known.support_labels))
        z = task.calibrated_logits(inputs(np.concatenate([ep.known.query, ep.unknown])))
        n = len(ep.known.query)
        yield OpenScores(z[:n], ep.known.query_labels, z[n:])


@dataclass
class OpenSetResult:
    """Per-task means in percent with their 95% intervals (``1.96 * std / sqrt(T)``): closed-set accuracy
    on the known queries, the AUROC of ``score`` (known vs unknown), and at ``threshold`` (the model's
    calibrated threshold for 95% acceptance) the acceptance of known and the rejection of unknown
    queries. ECE (%, 15 bins, pooled known queries) of the probabilities before (``T = 1``) and after
    temperature scaling."""

    accuracy: float
    accuracy_ci95: float
    auroc: float
    auroc_ci95: float
    acceptance: float
    acceptance_ci95: float
    rejection: float
    rejection_ci95: float
    ece_before: float
    ece_after: float
    score: str
    temperature: float
    threshold: float | None
    tasks: int
    seconds: float
    #: Per task: accuracy, AUROC, acceptance and rejection (fractions; the last two NaN without a threshold).
    per_task: list[tuple[float, float, float, float]] = field(repr=False, default_factory=list)


def _mean_ci(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64) * 100.0
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def evaluate_open_set(
    adapter: Adapter,
    dataset: ImageSet,
    inputs: Callable[[np.ndarray], torch.Tensor],
    ways: int,
    shots: int,
    queries: int = 15,
    tasks: int = 600,
    seed: int = 0,
    progress: bool = False,
) -> OpenSetResult:
    """``tasks`` open-set episodes through ``adapter``, scored by its calibration (``adapter.open_set``:
    temperature, score, threshold for :data:`~fewshot.models.calibration.DEFAULT_ACCEPTANCE`)."""
    cal: OpenSetCalibration = adapter.open_set
    threshold = cal.threshold(DEFAULT_ACCEPTANCE) if cal.thresholds else None
    start, per_task, known_all, labels_all = time.perf_counter(), [], [], []
    for ep in open_episodes(adapter, inputs, OpenSetSampler(dataset, ways, shots, queries, seed), tasks, progress):
        known, unknown = cal.scores(ep.known).double().numpy(), cal.scores(ep.unknown).double().numpy()
        accept = float((known >= threshold).mean()) if threshold is not None else float("nan")
        reject = float((unknown < threshold).mean()) if threshold is not None else float("nan")
        per_task.append((float((ep.known.argmax(1).numpy() == ep.labels).mean()), auroc(known, unknown), accept, reject))
        known_all.append(ep.known.double())
        labels_all.append(ep.labels)
    z, labels = torch.cat(known_all), np.concatenate(labels_all)
    after = expected_calibration_error(torch.softmax(z, 1).numpy(), labels)
    before = expected_calibration_error(torch.softmax(z * cal.temperature, 1).numpy(), labels)
    columns = list(zip(*per_task))
    (acc, acc_ci), (area, area_ci) = _mean_ci(list(columns[0])), _mean_ci(list(columns[1]))
    (accept, accept_ci), (reject, reject_ci) = _mean_ci(list(columns[2])), _mean_ci(list(columns[3]))
    return OpenSetResult(
        acc,
        acc_ci,
        area,
        area_ci,
        accept,
        accept_ci,
        reject,
        reject_ci,
        before,
        after,
        cal.score,
        cal.temperature,
        threshold,
        len(per_task),
        time.perf_counter() - start,
        per_task,
    )


def calibrate(
    adapter: Adapter,
    dataset: ImageSet,
    inputs: Callable[[np.ndarray], torch.Tensor],
    ways: int,
    shots: int,
    queries: int = 15,
    tasks: int = 300,
    seed: int = 0,
    progress: bool = False,
) -> tuple[OpenSetCalibration, dict[str, Any]]:
    """Calibrate ``adapter``'s method on ``tasks`` open-set **validation** episodes (``dataset`` is the
    validation split; distractor queries from other validation classes in every call):

    1. the temperature ``T`` minimising the NLL of the known queries (:func:`fit_temperature`);
    2. the score (:data:`~fewshot.models.calibration.SCORES`, on logits ``/ T``) with the highest mean
       per-task AUROC, known vs distractor queries;
    3. the thresholds at which each acceptance level of the pooled known queries is accepted.

    Returns the calibration and its record (validation AUROC per score, ECE before and after).
    """
    adapter.open_set = UNCALIBRATED
    episodes = list(open_episodes(adapter, inputs, OpenSetSampler(dataset, ways, shots, queries, seed), tasks, progress))
    known = torch.cat([e.known for e in episodes]).double()
    labels = np.concatenate([e.labels for e in episodes])
    temperature = fit_temperature(known.numpy(), labels)
    areas = {
        name: float(
            np.mean([auroc(fn(e.known.double() / temperature).numpy(), fn(e.unknown.double() / temperature).numpy()) for e in episodes])
        )
        * 100
        for name, fn in SCORES.items()
    }
    score = max(SCORES, key=lambda name: areas[name])
    cal = OpenSetCalibration(temperature, score, acceptance_thresholds(SCORES[score](known / temperature).numpy()))
    record = {
        "val_auroc": {k: round(v, 2) for k, v in areas.items()},
        "val_ece_before": round(expected_calibration_error(torch.softmax(known, 1).numpy(), labels), 2),
        "val_ece_after": round(expected_calibration_error(torch.softmax(known / temperature, 1).numpy(), labels), 2),
    }
    return cal, record
