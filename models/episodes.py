"""Seeded N-way K-shot Q-query episode sampling.

Task ``i`` of seed ``s`` depends only on ``(s, i)`` and the dataset, so the same seed always gives
the same tasks, whichever subset of them is evaluated and in whichever order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewshot.errors import ConfigError
from fewshot.models.data import ImageSet


@dataclass(frozen=True)
class Episode:
    """Indices into an :class:`ImageSet` for one task.

    Attributes:
        classes: ``(N,)`` dataset class ids; episode label ``j`` means ``classes[j]``.
        support: ``(N*K,)`` image indices, class-major (K of label 0, then K of label 1, ...).
        support_labels: ``(N*K,)`` episode labels in ``0..N-1``.
        query: ``(N*Q,)`` image indices, class-major.
        query_labels: ``(N*Q,)`` episode labels.
    """

    classes: np.ndarray
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


class EpisodeSampler:
    """Draws episodes from ``dataset``: ``ways`` classes, ``shots`` support and ``queries`` query
    images per class, with no image in both roles.

    Raises:
        ValueError: the dataset has fewer than ``ways`` classes, or a class has fewer than
            ``shots + queries`` images.
    """

    def __init__(self, dataset: ImageSet, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        if ways < 2:
            raise ConfigError(f"ways must be at least 2, got {ways}")
        if shots < 1 or queries < 0:
            raise ConfigError(f"shots must be >= 1 and queries >= 0, got shots={shots}, queries={queries}")
        self.by_class = dataset.indices_by_class()
        eligible = [c for c, idx in enumerate(self.by_class) if len(idx) >= shots + queries]
        if len(eligible) < ways:
            raise ConfigError(
                f"{ways}-way {shots}-shot {queries}-query needs {ways} classes with at least "
                f"{shots + queries} images; this dataset has {len(eligible)}"
            )
        self.eligible = np.array(eligible)
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed

    def episode(self, index: int) -> Episode:
        """Task number ``index`` (deterministic in ``(seed, index)``)."""
        rng = np.random.default_rng([self.seed, index])
        classes = rng.choice(self.eligible, size=self.ways, replace=False)
        support, query = [], []
        for c in classes:
            picked = rng.choice(self.by_class[c], size=self.shots + self.queries, replace=False)
            support.append(picked[: self.shots])
            query.append(picked[self.shots :])
        labels = np.arange(self.ways)
        return Episode(
            classes=classes,
            support=np.concatenate(support),
            support_labels=np.repeat(labels, self.shots),
            query=np.concatenate(query),
            query_labels=np.repeat(labels, self.queries),
        )

    def __iter__(self):
        i = 0
        while True:
            yield self.episode(i)
            i += 1
