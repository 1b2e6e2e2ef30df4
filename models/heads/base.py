"""The few-shot head interface: ``fit(support features) -> HeadState``, ``state.classify(query features)``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fewshot.errors import ConfigError


def check_support(features: torch.Tensor, labels: torch.Tensor) -> int:
    """Validate a support set; returns the number of classes ``N`` (labels must cover ``0..N-1``)."""
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ConfigError(f"support features (S, d) and labels (S,) expected, got {tuple(features.shape)} and {tuple(labels.shape)}")
    n = int(labels.max()) + 1 if len(labels) else 0
    counts = torch.bincount(labels, minlength=n)
    if n < 2:
        raise ConfigError(f"a task needs at least 2 classes, got {n}")
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ConfigError(f"classes {missing} have no support image")
    return n


def class_means(features: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """``(S, d)``, ``(S,)`` -> ``(N, d)`` per-class mean."""
    onehot = torch.nn.functional.one_hot(labels, n).to(features.dtype)
    return (onehot.T @ features) / onehot.sum(0)[:, None]


def sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(m, d)``, ``(n, d)`` -> ``(m, n)`` squared Euclidean distances, computed row by row so the
    result for one row does not depend on the other rows (batch invariance)."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


class HeadState(ABC):
    """What a head keeps for one task."""

    #: True when the prediction for one query depends on the other queries of the same call.
    transductive: bool = False

    @abstractmethod
    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` query features -> ``(Q, N)`` class probabilities."""


class FewShotHead(ABC):
    """A classifier built from support features."""

    name: str

    @abstractmethod
    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> HeadState:
        """``(S, d)`` features and ``(S,)`` labels in ``0..N-1`` -> the task's state."""
