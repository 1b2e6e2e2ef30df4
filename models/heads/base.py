"""The few-shot head interface: ``fit(support features) -> HeadState``, ``state.classify(query features)``."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

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


#: Head states by their stored ``kind`` (filled as the state classes are defined).
STATE_KINDS: dict[str, type["HeadState"]] = {}


class HeadState(ABC):
    """What a head keeps for one task: a dataclass whose tensor fields are its state.

    A subclass that sets ``kind`` is registered, and stores and restores itself without further code:
    :meth:`to_stored` puts every tensor field into the tensors (``None`` left out) and every other
    field into the metadata; :meth:`from_stored` reverses it. So a new head needs no change in the
    server's task persistence (``fewshot.server.state``).
    """

    #: The name its stored form carries (``centroid``, ``laplacianshot``, ...).
    kind: ClassVar[str] = ""
    #: True when the prediction for one query depends on the other queries of the same call.
    transductive: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            STATE_KINDS[cls.kind] = cls

    @abstractmethod
    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` query features -> ``(Q, N)`` class probabilities."""

    def to_stored(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, JSON-able metadata)`` of this state."""
        tensors, meta = {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value
            elif value is not None:
                meta[f.name] = value
        return tensors, meta

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "HeadState":
        """The state :meth:`to_stored` described; a missing optional field (``X | None``, e.g. ``center``)
        is ``None``, a missing required one raises ``KeyError``."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in tensors or f.name in meta:
                values[f.name] = tensors[f.name] if f.name in tensors else meta[f.name]
            elif "None" in str(f.type):
                values[f.name] = None
            else:
                raise KeyError(f"{cls.kind} state lacks {f.name!r}")
        return cls(**values)


class FewShotHead(ABC):
    """A classifier built from support features."""

    name: str

    @abstractmethod
    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> HeadState:
        """``(S, d)`` features and ``(S,)`` labels in ``0..N-1`` -> the task's state."""
