"""The metric family's adapter: features of a frozen backbone plus a few-shot head.

``MetricAdapter.adapt(support images, labels)`` returns a :class:`MetricTask` whose
``classify(query images)`` gives ``(Q, N)`` probabilities. ``fewshot eval`` and the server both use
this class, so served accuracy is measured accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewshot.models.features import FeatureExtractor
from fewshot.models.heads.base import FewShotHead, HeadState
from fewshot.models.plan import ClassifyPlan


@dataclass
class MetricTask:
    """A task's head state and the extractor that maps query images into its feature space."""

    state: HeadState
    extract: FeatureExtractor

    @property
    def transductive(self) -> bool:
        return self.state.transductive

    def plan(self) -> ClassifyPlan:
        """Backbone features (batch-invariant: merged across requests of the same backbone), then the
        head on this request's features alone (LaplacianShot stays transductive over one request)."""
        return ClassifyPlan(("features", id(self.extract)), self.extract, self.state.classify)

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised images -> ``(Q, N)`` probabilities."""
        return self.plan().run(query)


class MetricAdapter:
    """Frozen backbone features + head (nearest centroid or LaplacianShot)."""

    def __init__(self, extract: FeatureExtractor, head: FewShotHead) -> None:
        self.extract, self.head = extract, head

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> MetricTask:
        """``(S, C, H, W)`` normalised images, ``(S,)`` labels in ``0..N-1``."""
        return MetricTask(self.head.fit(self.extract(support), labels), self.extract)
