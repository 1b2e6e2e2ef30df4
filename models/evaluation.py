"""Episodic evaluation: T seeded tasks, mean accuracy and the 95% interval ``1.96 * std / sqrt(T)``
over per-task accuracies."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from fewshot.models.data import ImageSet
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.heads.base import FewShotHead


class TaskState(Protocol):
    """The adapted state of one task."""

    @property
    def transductive(self) -> bool:
        """Whether classification depends on the whole query batch."""

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised query images -> ``(Q, N)`` probabilities."""


class Adapter(Protocol):
    """Builds a task's state from its support set (shared by training, ``fewshot eval`` and the server)."""

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> TaskState:
        """``(S, C, H, W)`` normalised images and ``(S,)`` labels in ``0..N-1``."""


@dataclass
class EvalResult:
    """Accuracy in percent and its 95% confidence interval over ``tasks`` per-task accuracies."""

    accuracy: float
    ci95: float
    tasks: int
    seconds: float
    per_task: list[float] = field(repr=False, default_factory=list)
    #: Per task, the predicted class index of every query (in the episode's query order).
    predictions: list[list[int]] = field(repr=False, default_factory=list)


def summarize(per_task: list[float], seconds: float = 0.0) -> EvalResult:
    """Mean and ``1.96 * std / sqrt(T)`` (population std) of per-task accuracies (fractions) in percent."""
    a = np.asarray(per_task, dtype=np.float64) * 100.0
    ci = 1.96 * a.std() / math.sqrt(len(a)) if len(a) else float("nan")
    return EvalResult(float(a.mean()) if len(a) else float("nan"), float(ci), len(a), seconds, list(per_task))


def evaluate(
    adapter: Adapter,
    dataset: ImageSet,
    normalize: Callable[[np.ndarray], torch.Tensor],
    ways: int,
    shots: int,
    queries: int = 15,
    tasks: int = 600,
    seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Run ``tasks`` episodes through ``adapter`` on images, as the server does."""
    sampler = EpisodeSampler(dataset, ways, shots, queries, seed)
    start, per_task, predictions = time.perf_counter(), [], []
    for i in tqdm(range(tasks), desc=f"{ways}-way {shots}-shot", disable=not progress, leave=False):
        ep = sampler.episode(i)
        state = adapter.adapt(normalize(dataset.images[ep.support]), torch.as_tensor(ep.support_labels))
        predicted = state.classify(normalize(dataset.images[ep.query])).argmax(1).cpu().numpy()
        per_task.append(float((predicted == ep.query_labels).mean()))
        predictions.append(predicted.tolist())
    result = summarize(per_task, time.perf_counter() - start)
    result.predictions = predictions
    return result


def evaluate_features(
    features: torch.Tensor, dataset: ImageSet, head: FewShotHead, ways: int, shots: int, queries: int = 15, tasks: int = 600, seed: int = 0
) -> EvalResult:
    """The same episodes on precomputed features ``(len(dataset), d)`` (validation and lambda tuning:
    with BatchNorm in eval mode a feature does not depend on its batch)."""
    sampler = EpisodeSampler(dataset, ways, shots, queries, seed)
    start, per_task = time.perf_counter(), []
    for i in range(tasks):
        ep = sampler.episode(i)
        state = head.fit(features[ep.support], torch.as_tensor(ep.support_labels))
        probs = state.classify(features[ep.query])
        per_task.append(float((probs.argmax(1).cpu().numpy() == ep.query_labels).mean()))
    return summarize(per_task, time.perf_counter() - start)
