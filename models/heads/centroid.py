"""Nearest class centroid (Snell et al. 2017; SimpleShot, Wang et al. 2019). Inductive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fewshot.models.heads.base import FewShotHead, HeadState, check_support, class_means, sq_distances
from fewshot.models.heads.transforms import transform_features

if TYPE_CHECKING:
    from fewshot.models.tuning import TuningTasks


@dataclass
class CentroidState(HeadState):
    """Prototypes ``(N, d)`` in transformed feature space."""

    prototypes: torch.Tensor
    transform: str
    center: torch.Tensor | None
    kind = "centroid"
    transductive = False

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` -> ``(Q, N)``: negative squared distances to the prototypes."""
        q = transform_features(query, self.transform, self.center)
        return -sq_distances(q, self.prototypes)


class CentroidHead(FewShotHead):
    """Nearest centroid after a UN / L2N / CL2N feature transform."""

    name = "centroid"

    def __init__(self, transform: str = "CL2N", center: torch.Tensor | None = None) -> None:
        transform_features(torch.zeros(1, 1 if center is None else len(center)), transform, center)  # validates
        self.transform, self.center = transform, center

    @classmethod
    def from_card(cls, cfg: dict[str, Any], shots: int, center: torch.Tensor | None, **settings: Any) -> CentroidHead:
        return cls(settings.get("transform") or cfg["transform"], center)

    @classmethod
    def tune(cls, val: TuningTasks) -> tuple[dict[str, Any], dict[str, float]]:
        """Nothing beyond the model's transform (chosen by this head's validation accuracy)."""
        return {"transform": val.transform}, {}

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> CentroidState:
        n = check_support(support, labels)
        s = transform_features(support, self.transform, self.center)
        return CentroidState(class_means(s, labels, n), self.transform, self.center)

    def held_out_logits(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Leave-one-out in closed form, no refit: image ``i`` of class ``y`` (``n_y`` images, mean ``m_y``) is
        measured against ``(n_y m_y - x_i) / (n_y - 1)`` for its own class and the full means of the others."""
        n = check_support(support, labels)
        s = transform_features(support, self.transform, self.center)
        onehot = torch.nn.functional.one_hot(labels, n).to(s.dtype)
        counts, sums = onehot.sum(0), onehot.T @ s
        logits = -sq_distances(s, sums / counts[:, None])
        own = counts[labels]
        without = (sums[labels] - s) / (own - 1).clamp_min(1)[:, None]
        logits[torch.arange(len(labels)), labels] = -((s - without) ** 2).sum(1)
        logits[own < 2] = float("nan")
        return logits, 0
