"""Model families and heads as registered types: validation, adapters and stored tasks on small real
tensors, the logistic-regression head, and a new head that registers itself with one class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.models.family import FAMILIES, family_of, methods_of
from fewshot.models.heads import HEADS, STATE_KINDS, FewShotHead, HeadState
from fewshot.models.heads.base import check_support, class_means
from fewshot.models.heads.logreg import LogRegHead, fit_logistic_regression
from fewshot.models.metric_adapter import MetricFamily
from fewshot.models.runtime import SessionEngines, TorchSession
from fewshot.server.state import dump_task, load_task

pytestmark = pytest.mark.unit

MANIFEST = {
    "name": "toy",
    "family": "metric",
    "feature_dim": 8,
    "default_head": "centroid",
    "input": {"channels": 1, "size": 2, "mean": [0.0], "std": [1.0], "resize": "bilinear", "value_range": [0, 255], "layout": "NCHW"},
    "limits": {"max_ways": 10, "max_shots": 5},
    "heads": {
        "centroid": {"transform": "L2N"},
        "laplacianshot": {"transform": "L2N", "knn": 3, "lambda": {"1": 0.5, "5": 0.1}, "rectify": False},
        "logreg": {"transform": "L2N", "weight_decay": {"1": 0.1, "5": 0.01}, "steps": 50},
    },
}


def _toy(manifest: dict = MANIFEST) -> MetricFamily:
    """A metric model whose 'backbone' flattens 1x2x4 images into 8 features (in torch)."""
    engines = SessionEngines({"backbone": TorchSession(torch.nn.Flatten(), ["images"], "cpu")})
    return family_of(manifest)(manifest, {}, engines, "cpu")


def _task_data(ways: int = 3, shots: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(ways, 8, generator=g)
    labels = torch.arange(ways).repeat_interleave(shots)
    support = means[labels] + 0.3 * torch.randn(len(labels), 8, generator=g)
    query_labels = torch.arange(ways).repeat_interleave(4)
    query = means[query_labels] + 0.3 * torch.randn(len(query_labels), 8, generator=g)
    return support.reshape(-1, 1, 2, 4), labels, query.reshape(-1, 1, 2, 4), query_labels


def test_families_are_registered_by_the_name_cards_carry():
    family_of(MANIFEST)
    assert set(FAMILIES) == {"metric", "inner_loop"}
    with pytest.raises(ConfigError, match="unknown family 'svm'"):
        family_of({"name": "x", "family": "svm"})


def test_a_metric_models_methods_are_the_registered_heads_its_card_configures():
    assert methods_of(MANIFEST) == ["centroid", "laplacianshot", "logreg"]
    model = _toy()
    assert model.resolve_method(None) == "centroid" and model.way_range() == (2, 10)
    with pytest.raises(ConfigError, match="unknown method 'svm'"):
        model.resolve_method("svm")
    assert methods_of({**MANIFEST, "heads": {"centroid": {"transform": "L2N"}}}) == ["centroid"]


def test_settings_are_checked_against_what_the_method_declares():
    model = _toy()
    assert model.check_settings("laplacianshot", {"lambda": 2.0, "inner_steps": None}) == {"lam": 2.0}
    assert model.check_settings("logreg", {"weight_decay": 0.5}) == {"weight_decay": 0.5}
    with pytest.raises(ConfigError, match="lambda does not apply to method centroid"):
        model.check_settings("centroid", {"lambda": 1.0})
    with pytest.raises(ConfigError, match=r"lambda must be a number in 0..1000"):
        model.check_settings("laplacianshot", {"lambda": -1.0})
    with pytest.raises(ConfigError, match="transform must be one of"):
        model.check_settings("centroid", {"transform": "PCA"})
    with pytest.raises(ConfigError, match="allows at most 10"):
        model.check_ways(11)


@pytest.mark.parametrize("method", ["centroid", "laplacianshot", "logreg"])
def test_every_head_adapts_classifies_and_restores_through_the_family(method):
    model = _toy()
    support, labels, query, truth = _task_data()
    task = model.adapter(method, shots=2).adapt(support, labels)
    probs = task.classify(query)
    assert probs.shape == (12, 3) and torch.allclose(probs.sum(1), torch.ones(12), atol=1e-5)
    assert (probs.argmax(1) == truth).float().mean() >= 0.9
    restored = load_task(dump_task(task), model)
    assert torch.equal(restored.classify(query), probs)


def test_the_card_setting_of_the_nearest_shot_count_is_used():
    model = _toy()
    assert model.adapter("logreg", shots=1).head.weight_decay == 0.1
    assert model.adapter("logreg", shots=4).head.weight_decay == 0.01
    assert model.adapter("laplacianshot", shots=2).head.lam == 0.5
    assert model.adapter("logreg", shots=1, weight_decay=3.0).head.weight_decay == 3.0


def test_logistic_regression_is_deterministic_and_reaches_the_primal_optimum():
    support, labels, _, _ = _task_data(4, 5, seed=3)
    x = torch.nn.functional.normalize(support.reshape(len(support), -1), dim=1)
    w1, b1 = fit_logistic_regression(x, labels, 4, 0.05)
    w2, b2 = fit_logistic_regression(x, labels, 4, 0.05)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    # The fit runs in the span of the support features; at its optimum the gradient of the primal
    # objective (over W in R^{N x d} and b) vanishes (up to the float32 rounding of the returned weights).
    w, b = w1.double().requires_grad_(True), b1.double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x.double() @ w.T + b, labels) + 0.025 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4  # float32 weights; at W = 0 it is ~1e-1


def test_logreg_refuses_bad_settings():
    with pytest.raises(ConfigError):
        LogRegHead(-1.0)
    with pytest.raises(ConfigError):
        LogRegHead(0.1, "CL2N", None)  # CL2N needs the centering vector


@dataclass
class _NearestNeighbourState(HeadState):
    support: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    kind = "test-1nn"

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """Minus the distance to the nearest support image of each class."""
        d = torch.cdist(query, self.support)
        return torch.stack([-d[:, self.labels == c].min(1).values for c in range(self.n_classes)], 1)


def test_a_new_head_is_one_class_and_then_works_through_the_family():
    """What adding a head takes: a FewShotHead with a name and a HeadState with a kind (in
    ``models/heads/<name>.py``, imported by ``models/heads/__init__.py``). The family then offers it to
    every model whose card configures it, validates it, and stores and restores its tasks."""

    class NearestNeighbourHead(FewShotHead):
        name = "test-1nn"

        def __init__(self, transform: str = "UN") -> None:
            self.transform = transform

        @classmethod
        def from_card(cls, cfg: dict[str, Any], shots: int, center, **settings: Any) -> NearestNeighbourHead:
            return cls(settings.get("transform") or cfg.get("transform", "UN"))

        @classmethod
        def tune(cls, val):
            return {"transform": val.transform}, {}

        def fit(self, support: torch.Tensor, labels: torch.Tensor) -> _NearestNeighbourState:
            return _NearestNeighbourState(support, labels, check_support(support, labels))

    try:
        manifest = {**MANIFEST, "heads": {**MANIFEST["heads"], "test-1nn": {}}}
        model = _toy(manifest)
        assert "test-1nn" in model.methods
        support, labels, query, truth = _task_data()
        task = model.adapter("test-1nn").adapt(support, labels)
        assert (task.classify(query).argmax(1) == truth).float().mean() >= 0.9
        assert torch.equal(load_task(dump_task(task), model).classify(query), task.classify(query))
        assert class_means(support.reshape(6, -1), labels, 3).shape == (3, 8)
    finally:
        HEADS.pop("test-1nn", None)
        STATE_KINDS.pop("test-1nn", None)


@pytest.mark.parametrize("method", ["centroid", "laplacianshot", "logreg"])
def test_a_task_carries_its_methods_calibration_through_storage(method):
    """The card's open-set block gives the adapter of (method, nearest shot count) its temperature, score
    and thresholds; the task's probabilities are softmax(logits / T), and a stored task restores with them."""
    from fewshot.models.calibration import OpenSetCalibration

    cal = OpenSetCalibration(0.25, "energy", {0.5: -1.0, 0.95: -2.0})
    manifest = {
        **MANIFEST,
        "open_set": {"methods": {method: {"by_shots": {"1": {"temperature": 1.0, "score": "max_logit"}, "5": cal.to_dict()}}}},
    }
    model = _toy(manifest)
    support, labels, query, _ = _task_data(shots=4)
    task = model.adapter(method, shots=4).adapt(support, labels)
    assert task.open_set == cal and model.adapter(method, shots=1).open_set.score == "max_logit"
    raw = task.state.logits(model.extract(query))
    torch.testing.assert_close(task.calibrated_logits(query), raw / 0.25)
    torch.testing.assert_close(task.classify(query), torch.softmax(raw / 0.25, 1))
    restored = load_task(dump_task(task), model)
    assert restored.open_set == cal and torch.equal(restored.calibrated_logits(query), task.calibrated_logits(query))


def test_warm_up_runs_every_method_of_every_model_once_per_round():
    from fewshot.server.warmup import WARM_QUERIES, warm_up

    seen: list[int] = []

    class Counting(torch.nn.Flatten):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(len(x))
            return super().forward(x)

    engines = SessionEngines({"backbone": TorchSession(Counting(), ["images"], "cpu")})
    model = family_of(MANIFEST)(MANIFEST, {}, engines, "cpu")
    spent = warm_up({"toy": model}, rounds=2)
    assert set(spent) == {"toy"} and spent["toy"] >= 0
    # per method and round: one support pass (5 ways x 5 shots), then one pass per query count
    assert seen == [25, *WARM_QUERIES] * (len(model.methods) * 2)
