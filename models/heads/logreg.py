"""Logistic regression on backbone features (Tian et al., "Rethinking Few-Shot Image Classification:
a Good Embedding Is All You Need?", ECCV 2020). Inductive.

The support features are L2-normalised (or centred and normalised, whichever the model's transform
is), and a multinomial logistic regression ``p(c | x) = softmax(W x + b)_c`` is fitted on them by
minimising ``mean_s CE(W x_s + b, y_s) + (weight_decay / 2) ||W||^2`` (the paper's baseline is
scikit-learn's ``LogisticRegression``, an L2-penalised multinomial fit by L-BFGS). Here: SciPy's
L-BFGS-B from zero weights, in the span of the support features (:func:`fit_logistic_regression`), at
most :data:`MAX_STEPS` iterations, in float64, so a fit is deterministic. The weight decay is chosen per shot count on validation tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fewshot.errors import ConfigError
from fewshot.models.heads.base import FewShotHead, HeadState, check_support, nearest_shot
from fewshot.models.heads.transforms import transform_features
from fewshot.models.settings import Setting

if TYPE_CHECKING:
    from fewshot.models.tuning import TuningTasks

#: L-BFGS iterations per fit (each iteration may evaluate the loss a few times in its line search).
MAX_STEPS = 100
#: Weight-decay grid searched on validation tasks.
WEIGHT_DECAY_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
#: The range a request may give.
MAX_WEIGHT_DECAY = 10.0


@dataclass
class LogRegState(HeadState):
    """The fitted classifier: ``weight (N, d)``, ``bias (N,)`` on transformed features."""

    weight: torch.Tensor
    bias: torch.Tensor
    transform: str
    center: torch.Tensor | None
    kind = "logreg"

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` -> ``(Q, N)``: ``W q + b``."""
        q = transform_features(query, self.transform, self.center)
        return q @ self.weight.T.to(q.dtype) + self.bias.to(q.dtype)


def fit_logistic_regression(
    x: torch.Tensor, labels: torch.Tensor, n: int, weight_decay: float, steps: int = MAX_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, d)`` features, ``(S,)`` labels in ``0..n-1`` -> ``(weight (n, d), bias (n,))`` in float32,
    minimising ``L = mean_s CE(W x_s + b, y_s) + weight_decay / 2 * ||W||^2`` (bias not penalised).

    With an L2 penalty the minimiser lies in the span of the support features (representer theorem):
    ``W = A X`` with ``A (n, S)``. So the fit runs on the ``(S, S)`` Gram matrix ``K = X X^T``: logits
    ``Z = A K + b``, penalty ``tr(A K A^T)``, gradients ``dL/dA = ((P - Y) / S + weight_decay A) K`` and
    ``dL/db = (P - Y) 1 / S`` (``P`` the softmax of ``Z`` per sample, ``Y`` the one-hot labels): the same
    optimum as over ``W`` at ``S / d`` of the cost. SciPy's L-BFGS-B (the solver of the paper's
    scikit-learn baseline) runs at most ``steps`` iterations from zero, in float64.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    x64 = x.detach().cpu().double()
    gram = (x64 @ x64.T).numpy()
    count = len(gram)
    onehot = np.zeros((n, count))
    onehot[labels.cpu().numpy(), np.arange(count)] = 1.0

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[:-n].reshape(n, count), theta[-n:]
        ak = a @ gram
        z = ak + b[:, None]
        z = z - z.max(0, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(0, keepdims=True))
        loss = -(onehot * log_p).sum() / count + 0.5 * weight_decay * (ak * a).sum()
        residual = (np.exp(log_p) - onehot) / count
        grad_a = (residual + weight_decay * a) @ gram
        return float(loss), np.concatenate([grad_a.ravel(), residual.sum(1)])

    # One BLAS thread: the matrices are (n, S) and (S, S); on a loaded machine BLAS threads spinning on
    # them made a fit 20-50x slower than running it on one core.
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(
            objective, np.zeros(n * count + n), jac=True, method="L-BFGS-B", options={"maxiter": steps, "gtol": 1e-10, "ftol": 1e-15}
        )
    theta = torch.from_numpy(result.x)
    return (theta[:-n].view(n, count) @ x64).float(), theta[-n:].float()


class LogRegHead(FewShotHead):
    """Multinomial logistic regression after the model's feature transform."""

    name = "logreg"
    settings = {"weight_decay": Setting("weight_decay", "weight_decay", 0.0, MAX_WEIGHT_DECAY)}

    def __init__(
        self, weight_decay: float = 1e-3, transform: str = "L2N", center: torch.Tensor | None = None, steps: int = MAX_STEPS
    ) -> None:
        if weight_decay < 0 or steps < 1:
            raise ConfigError(f"weight_decay must be >= 0 and steps >= 1, got {weight_decay} and {steps}")
        transform_features(torch.zeros(1, 1 if center is None else len(center)), transform, center)  # validates
        self.weight_decay, self.transform, self.center, self.steps = weight_decay, transform, center, steps

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> LogRegState:
        n = check_support(support, labels)
        s = transform_features(support, self.transform, self.center)
        weight, bias = fit_logistic_regression(s, labels, n, self.weight_decay, self.steps)
        return LogRegState(weight, bias, self.transform, self.center)

    @classmethod
    def from_card(cls, cfg: dict[str, Any], shots: int, center: torch.Tensor | None, **settings: Any) -> LogRegHead:
        """The weight decay tuned for the nearest tuned shot count, unless the request gives one."""
        wd = settings.get("weight_decay")
        return cls(
            float(nearest_shot(cfg["weight_decay"], shots) if wd is None else wd),
            settings.get("transform") or cfg["transform"],
            center,
            int(cfg.get("steps", MAX_STEPS)),
        )

    @classmethod
    def tune(cls, val: TuningTasks) -> tuple[dict[str, Any], dict[str, float]]:
        """Weight decay per shot count over :data:`WEIGHT_DECAY_GRID`, under the model's transform."""
        chosen, scores = {}, {}
        for shots in (1, 5):
            acc = {wd: val.accuracy(cls(wd, val.transform, val.center), shots) for wd in WEIGHT_DECAY_GRID}
            chosen[str(shots)] = max(WEIGHT_DECAY_GRID, key=acc.__getitem__)
            scores[f"logreg_{shots}shot"] = acc[chosen[str(shots)]]
        return {
            "transform": val.transform,
            "weight_decay": chosen,
            "steps": MAX_STEPS,
            "weight_decay_grid": list(WEIGHT_DECAY_GRID),
        }, scores

    def describe(self) -> dict[str, Any]:
        return {"transform": self.transform, "weight_decay": self.weight_decay}
