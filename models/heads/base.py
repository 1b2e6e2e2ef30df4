"""The few-shot head interface: ``fit(support features) -> HeadState``, ``state.logits(query features)``.

A head is one module under ``models/heads/``: a :class:`FewShotHead` subclass with a ``name`` (which
registers it in :data:`HEADS`), how it is built from a model card (:meth:`FewShotHead.from_card`), how
its settings are chosen on validation tasks (:meth:`FewShotHead.tune`), the settings a request may
give, and a :class:`HeadState` subclass with a ``kind`` (which registers its stored form). Importing the
module in ``models/heads/__init__.py`` is the one registration line; evaluation, packaging, export,
the gRPC service, the Triton models and task persistence then know it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fewshot.errors import ConfigError
from fewshot.models.settings import Setting

if TYPE_CHECKING:
    from fewshot.models.tuning import TuningTasks


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


#: Bytes of one block of query-minus-prototype differences in :func:`sq_distances`: under the server's 1 MB
#: fresh-mapping threshold (``server/memory.py``), so the block's memory is reused from call to call.
DIFFERENCE_BLOCK_BYTES = (1 << 20) - (64 << 10)


def sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(m, d)``, ``(n, d)`` -> ``(m, n)`` squared Euclidean distances ``sum_k (a_ik - b_jk)^2``, each an
    independent sum over ``k``, so the result for one row does not depend on the other rows (batch invariance).

    Rows go in blocks whose ``(rows, n, d)`` differences fit :data:`DIFFERENCE_BLOCK_BYTES`: the same values as
    broadcasting the whole ``(m, n, d)`` at once, without that temporary (64 queries x 5 classes x 3136 features
    is 4 MB, a fresh mapping per call under the server's allocator settings; BENCHMARKS.md, "The served path
    against its own engine"), and with three tensor operations per block rather than per class."""
    if not len(b) or not len(a):
        return a.new_zeros(len(a), len(b))
    rows = max(1, DIFFERENCE_BLOCK_BYTES // (b.numel() * b.element_size()))
    blocks = []
    for start in range(0, len(a), rows):
        diff = a[start : start + rows, None, :] - b[None]
        blocks.append(diff.mul_(diff).sum(-1))
    return torch.cat(blocks)


#: Head states by their stored ``kind`` (filled as the state classes are defined).
STATE_KINDS: dict[str, type[HeadState]] = {}


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
    if TYPE_CHECKING:  # every concrete state is a dataclass (what dataclasses.fields needs)
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            STATE_KINDS[cls.kind] = cls

    @abstractmethod
    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` query features -> ``(Q, N)`` the head's own logits (before temperature scaling:
        :mod:`fewshot.models.calibration`)."""

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` query features -> ``(Q, N)`` class probabilities, ``softmax(logits)``."""
        return torch.softmax(self.logits(query), dim=1)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` backbone features -> ``(B, d)`` in the space the head measures in (its feature transform):
        what the support-set report and the nearest-support explanations compare."""
        from fewshot.models.heads.transforms import transform_features

        return transform_features(features, getattr(self, "transform", "UN"), getattr(self, "center", None))

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
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> HeadState:
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


#: Heads by name (filled as the head classes are defined; ``models/heads/__init__.py`` imports them all).
HEADS: dict[str, type[FewShotHead]] = {}


def nearest_shot(by_shot: Mapping[str, Any], shots: int) -> Any:
    """The value tuned for the shot count nearest ``shots`` in a card's ``{"1": v, "5": w}``."""
    return by_shot[min(by_shot, key=lambda k: abs(int(k) - shots))]


class FewShotHead(ABC):
    """A classifier built from support features.

    Subclasses set ``name`` (registered in :data:`HEADS`) and ``settings`` (what a request may override,
    by API name; the feature ``transform`` is always one).
    """

    name: ClassVar[str] = ""
    settings: ClassVar[dict[str, Setting]] = {}
    transform: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            HEADS[cls.name] = cls

    @classmethod
    @abstractmethod
    def from_card(cls, cfg: dict[str, Any], shots: int, center: torch.Tensor | None, **settings: Any) -> FewShotHead:
        """The head as the card's ``heads[name]`` block ``cfg`` configures it for ``shots``-shot tasks;
        ``settings`` (adapter keywords, already validated) override the card."""

    @classmethod
    @abstractmethod
    def tune(cls, val: TuningTasks) -> tuple[dict[str, Any], dict[str, float]]:
        """Choose this head's settings on validation tasks: ``(card block, validation accuracy by key)``."""

    def describe(self) -> dict[str, Any]:
        """The settings this head runs with, as ``fewshot eval`` reports them."""
        return {"transform": self.transform}

    @abstractmethod
    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> HeadState:
        """``(S, d)`` features and ``(S,)`` labels in ``0..N-1`` -> the task's state."""

    def held_out_logits(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(S, N)`` logits of each support image by this head fitted without it (NaN rows: the only image of its
        class), and the fits that took. By default leave-one-shot-out: fit ``k`` holds out the ``k``-th image of
        every class with at least 2 (``shots`` fits; a transductive head classifies each held-out fold together)."""
        from fewshot.models.report import shot_ranks

        n = check_support(support, labels)
        counts = torch.bincount(labels, minlength=n)
        holdable, ranks = counts[labels] >= 2, shot_ranks(labels)
        out = torch.full((len(labels), n), float("nan"))
        fits = 0
        for k in range(int(counts.max())):
            hold = holdable & (ranks == k)
            if hold.any():
                out[hold] = self.fit(support[~hold], labels[~hold]).logits(support[hold]).float()
                fits += 1
        return out, fits
