"""The metric family: features of a frozen backbone plus a few-shot head.

``MetricAdapter.adapt(support images, labels)`` returns a :class:`MetricTask` whose
``classify(query images)`` gives ``(Q, N)`` probabilities. :class:`MetricFamily` builds them for any
registered head (:data:`fewshot.models.heads.HEADS`) from the model's card or manifest, so
``fewshot eval``, the gRPC service and the Triton models run the same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

from fewshot.errors import ConfigError
from fewshot.models.calibration import UNCALIBRATED, OpenSetCalibration, calibration_for
from fewshot.models.family import Adapter, Family, Part
from fewshot.models.features import SessionFeatures
from fewshot.models.heads import HEADS, STATE_KINDS, FewShotHead, HeadState
from fewshot.models.heads.transforms import TRANSFORMS
from fewshot.models.plan import ClassifyPlan, PlannedTask
from fewshot.models.report import HeldOut
from fewshot.models.runtime import Engines, TensorSpec
from fewshot.models.settings import Setting


@dataclass
class MetricTask(PlannedTask):
    """A task's head state and the extractor that maps query images into its feature space."""

    state: HeadState
    #: Query images -> features (the model's backbone; the identity for calibration on precomputed features).
    extract: Callable[[torch.Tensor], torch.Tensor]
    open_set: OpenSetCalibration = UNCALIBRATED

    def plan(self) -> ClassifyPlan:
        """Backbone features (batch-invariant: merged across requests of the same backbone), then the
        head on this request's features alone (LaplacianShot stays transductive over one request) and
        the temperature."""
        return ClassifyPlan(("features", id(self.extract)), self.extract, self.head_logits)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` features -> ``(Q, N)`` calibrated logits."""
        return self.open_set.calibrate(self.state.logits(features))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` normalised images -> ``(B, d)`` features in the head's space (its transform)."""
        return self.state.embed(self.extract(images))

    def logits_and_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, C, H, W)`` -> ``((Q, N) calibrated logits, (Q, d) features in the head's space)`` from one backbone
        pass (a Classify that explains its answers): the logits are the plan's (:meth:`head_logits` of the same
        batch-invariant features)."""
        features = self.extract(images)
        return self.head_logits(features), self.state.embed(features)

    def to_stored(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = self.state.to_stored()
        return tensors, {"kind": self.state.kind, **meta, "open_set": self.open_set.to_dict()}


class MetricAdapter:
    """Frozen backbone features + head (nearest centroid, LaplacianShot, logistic regression, ...)."""

    def __init__(
        self, extract: Callable[[torch.Tensor], torch.Tensor], head: FewShotHead, open_set: OpenSetCalibration = UNCALIBRATED
    ) -> None:
        self.extract, self.head, self.open_set = extract, head, open_set

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> MetricTask:
        """``(S, C, H, W)`` normalised images, ``(S,)`` labels in ``0..N-1``."""
        return self.adapt_scored(support, labels)[0]

    def adapt_scored(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[MetricTask, torch.Tensor]:
        """The task and its ``(S, N)`` probabilities on the support set itself (what ``classify(support)``
        gives), from one backbone pass over the support images."""
        task, probabilities, _ = self._fit(support, labels)
        return task, probabilities

    def adapt_reported(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[MetricTask, torch.Tensor, HeldOut, torch.Tensor]:
        """:meth:`adapt_scored`, the held-out predictions of the support set (:meth:`FewShotHead.held_out_logits`
        on the same features: no extra backbone pass) and the ``(S, d)`` support features in the head's space."""
        task, probabilities, features = self._fit(support, labels)
        logits, fits = self.head.held_out_logits(features, labels)
        held = HeldOut(torch.softmax(self.open_set.calibrate(logits), dim=1), "leave-one-out" if fits == 0 else "leave-one-shot-out", fits)
        return task, probabilities, held, task.state.embed(features)

    def _fit(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[MetricTask, torch.Tensor, torch.Tensor]:
        """``(task, (S, N) support probabilities, (S, d) backbone features)`` from one backbone pass."""
        features = self.extract(support)
        task = MetricTask(self.head.fit(features, labels), self.extract, self.open_set)
        return task, torch.softmax(task.head_logits(features), dim=1), features


#: Every metric head takes the feature transform as a setting (``fewshot eval --transform``).
TRANSFORM = Setting("transform", "transform", choices=TRANSFORMS)


class MetricFamily(Family):
    """A backbone (``backbone.onnx``: images -> features), its centering vector and the heads its card
    configured: the methods are the registered heads the card has settings for."""

    family = "metric"
    parts = (Part("backbone", "features", batched=True),)

    def __init__(self, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], engines: Engines, device: str = "auto") -> None:
        super().__init__(manifest, tensors, engines, device)
        self.center: torch.Tensor | None = tensors.get("center")
        self.feature_dim = int(self.manifest["feature_dim"])
        self.extract = SessionFeatures(engines.session("backbone"), self.feature_dim)

    @classmethod
    def load_shipped(cls, path: Any, card: Any, tensors: dict[str, torch.Tensor]) -> Any:
        from fewshot.models.zoo import load_metric_model

        return load_metric_model(path, card, tensors)

    @classmethod
    def methods_for(cls, manifest: Mapping[str, Any]) -> list[str]:
        """The registered heads the card has settings for."""
        return [h for h in HEADS if h in manifest["heads"]]

    @property
    def default_method(self) -> str:
        return self.manifest["default_head"]

    def way_range(self) -> tuple[int, int]:
        return 2, int(self.limits.get("max_ways", 50))

    def settings(self, method: str) -> dict[str, Setting]:
        return {"transform": TRANSFORM, **HEADS[method].settings}

    def adapter(self, method: str | None = None, shots: int = 1, **settings: Any) -> MetricAdapter:
        method = self.resolve_method(method)
        return MetricAdapter(
            self.extract,
            HEADS[method].from_card(self.manifest["heads"][method], shots, self.center, **settings),
            calibration_for(self.manifest, method, shots),
        )

    def describe(self, adapter: Adapter) -> dict[str, Any]:
        # a family is only given the adapters its own adapter() built
        return cast(MetricAdapter, adapter).head.describe()

    def calibration_inputs(self, images: Any) -> Callable[[Any], torch.Tensor]:
        """The backbone's features of every validation image, computed once: the heads fit on them."""
        from fewshot.models.packaging import image_features

        features = image_features(self.extract, self.spec)(images)
        return lambda idx: features[idx]

    def calibration_adapter(self, method: str, shots: int) -> MetricAdapter:
        return MetricAdapter(lambda f: f, self.adapter(method, shots=shots).head)

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> MetricTask:
        meta = dict(meta)
        kind = meta.pop("kind", None)
        open_set = OpenSetCalibration.from_dict(meta.pop("open_set", None))
        if kind not in STATE_KINDS:
            raise ConfigError(f"a stored task of kind {kind!r} is not a metric head's ({', '.join(sorted(STATE_KINDS))})")
        return MetricTask(STATE_KINDS[kind].from_stored(tensors, meta), self.extract, open_set)

    @classmethod
    def result_runs(cls, card: Mapping[str, Any], settings: list[tuple[int, int]]) -> list[tuple[int, int, str, list[str]]]:
        """Every setting of the dataset with every head the card configures."""
        return [(w, s, head, []) for w, s in settings for head in HEADS if head in card["heads"]]

    def part_output(self, part: Part) -> TensorSpec:
        return TensorSpec("features", "FP32", (-1, self.feature_dim))
