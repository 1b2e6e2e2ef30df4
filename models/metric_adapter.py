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


@dataclass
class MetricTask:
    """A task's head state and the extractor that maps query images into its feature space."""

    state: HeadState
    extract: FeatureExtractor

    @property
    def transductive(self) -> bool:
        return self.state.transductive

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised images -> ``(Q, N)`` probabilities."""
        return self.classify_features(self.extract(query))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` features (already extracted, e.g. in a merged batch) -> ``(Q, N)``."""
        return self.state.classify(features)


class MetricAdapter:
    """Frozen backbone features + head (nearest centroid or LaplacianShot)."""

    def __init__(self, extract: FeatureExtractor, head: FewShotHead) -> None:
        self.extract, self.head = extract, head

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> MetricTask:
        """``(S, C, H, W)`` normalised images, ``(S,)`` labels in ``0..N-1``."""
        return MetricTask(self.head.fit(self.extract(support), labels), self.extract)
