"""Choosing head settings on validation tasks (``fewshot package`` and ``fewshot tune``).

The feature transform is chosen first, by nearest-centroid accuracy on 1-shot validation tasks (every
head then starts from it); each registered head then chooses its own settings with
:meth:`~fewshot.models.heads.base.FewShotHead.tune` on the same seeded tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fewshot.models.data import ImageSet
from fewshot.models.evaluation import evaluate_features
from fewshot.models.heads import HEADS
from fewshot.models.heads.base import FewShotHead
from fewshot.models.heads.transforms import TRANSFORMS

#: Validation tasks are 5-way with 15 queries per class, at these shot counts.
TUNE_WAYS, TUNE_QUERIES, TUNE_SHOTS = 5, 15, (1, 5)


@dataclass
class TuningTasks:
    """Seeded validation tasks on precomputed features ``(len(data), d)``; ``transform`` is the one
    chosen for the model (:func:`choose_transform`)."""

    features: torch.Tensor
    data: ImageSet
    center: torch.Tensor | None
    tasks: int
    seed: int
    transform: str = "CL2N"

    def accuracy(self, head: FewShotHead, shots: int) -> float:
        """Mean accuracy (%) of ``head`` on the ``shots``-shot validation tasks."""
        return evaluate_features(self.features, self.data, head, TUNE_WAYS, shots, TUNE_QUERIES, self.tasks, self.seed).accuracy


def choose_transform(val: TuningTasks) -> str:
    """The transform under which nearest centroid is most accurate on 1-shot validation tasks."""
    centroid = HEADS["centroid"]
    return max(TRANSFORMS, key=lambda t: val.accuracy(centroid.from_card({"transform": t}, 1, val.center), 1))


def tune_heads(val: TuningTasks, heads: Iterable[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(heads block of a card, validation record)`` for ``heads`` (default: every registered head)."""
    val.transform = choose_transform(val)
    block: dict[str, Any] = {}
    scores: dict[str, float] = {}
    for name in heads or HEADS:
        block[name], head_scores = HEADS[name].tune(val)
        scores |= head_scores
    record = {"tasks": val.tasks, "seed": val.seed, "ways": TUNE_WAYS, "queries": TUNE_QUERIES, "accuracy": scores}
    return block, record
