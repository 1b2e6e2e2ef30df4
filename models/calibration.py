"""Calibrated probabilities and the "none of these" score of a task (issue 16).

Every task's plan ends in **calibrated logits** ``z = logits / T`` (``(Q, N)``): its probabilities are
``softmax(z)``, with the temperature ``T`` fitted per model, method and shot count on validation tasks
(temperature scaling, Guo et al., ICML 2017: the ``T`` that minimises the negative log-likelihood of
the known-class queries; argmax and ranking are unchanged). How well a query fits its best class is a
score of ``z`` (higher: more likely a known class):

- ``max_probability``: ``max_c softmax(z)_c`` (Hendrycks and Gimpel, ICLR 2017);
- ``max_logit``: ``max_c z_c`` (Vaze et al., ICLR 2022: a good closed-set classifier's max logit is a
  strong open-set baseline); for nearest centroid it is ``-min_c ||q - m_c||^2 / T``, a distance;
- ``energy``: ``logsumexp_c z_c``, the negative free energy (Liu et al., NeurIPS 2020).

:class:`OpenSetCalibration` is what a task carries: ``T``, the score its method uses (the one with the
best validation AUROC) and the thresholds at which given fractions of known validation queries are
accepted (a query whose score is below the threshold is ``unknown``). It is chosen by
:func:`fewshot.models.openset.calibrate` and stored in the model card's ``open_set`` block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fewshot.errors import ConfigError

#: The open-set scores by name: ``(Q, N)`` calibrated logits -> ``(Q,)``, higher for known classes.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_probability": lambda z: torch.softmax(z, dim=1).max(1).values,
    "max_logit": lambda z: z.max(1).values,
    "energy": lambda z: torch.logsumexp(z, dim=1),
}
#: The known-query acceptance rates at which thresholds are stored; a request's target recall lies
#: between the first and the last (thresholds in between are interpolated linearly).
ACCEPTANCE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
#: The acceptance rate of known queries that the default threshold is calibrated for.
DEFAULT_ACCEPTANCE = 0.95
#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: The temperatures searched when fitting (log-uniform bounds).
TEMPERATURE_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class OpenSetCalibration:
    """A task's temperature, open-set score and thresholds (``{acceptance: threshold}``; empty for a
    model packaged before calibration existed: rejection then needs an explicit threshold)."""

    temperature: float = 1.0
    score: str = "max_probability"
    thresholds: Mapping[float, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError(f"unknown open-set score {self.score!r}: use {', '.join(SCORES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"a temperature must be positive and finite, got {self.temperature}")

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """``(Q, N)`` logits of the head or network -> calibrated logits ``logits / T``."""
        return logits if self.temperature == 1.0 else logits / self.temperature

    def scores(self, calibrated: torch.Tensor) -> torch.Tensor:
        """``(Q, N)`` calibrated logits -> ``(Q,)`` scores by this method's score."""
        return SCORES[self.score](calibrated)

    def threshold(self, acceptance: float = DEFAULT_ACCEPTANCE) -> float:
        """The score above which ``acceptance`` of known validation queries lay (interpolated)."""
        if not self.thresholds:
            raise ConfigError(
                "this model was packaged without open-set calibration: give an explicit threshold, "
                "or re-run `fewshot calibrate` and export it again"
            )
        lo, hi = ACCEPTANCE_LEVELS[0], ACCEPTANCE_LEVELS[-1]
        if not lo <= acceptance <= hi:
            raise ConfigError(f"a target recall must be in {lo}..{hi}, got {acceptance}")
        levels = sorted(self.thresholds)
        return float(np.interp(acceptance, levels, [self.thresholds[a] for a in levels]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "score": self.score,
            "thresholds": {f"{a:g}": t for a, t in sorted(self.thresholds.items())},
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> OpenSetCalibration:
        """The calibration :meth:`to_dict` wrote; ``None`` or ``{}``: uncalibrated (``T = 1``, max probability)."""
        if not d:
            return OpenSetCalibration()
        return OpenSetCalibration(
            float(d["temperature"]), str(d["score"]), {float(a): float(t) for a, t in d.get("thresholds", {}).items()}
        )


#: What tasks carry when their model has no calibration for them.
UNCALIBRATED = OpenSetCalibration()


def calibration_for(manifest: Mapping[str, Any], method: str, shots: int) -> OpenSetCalibration:
    """The card's (or manifest's) ``open_set.methods[method]`` calibration for the nearest calibrated shot count."""
    by_shot = manifest.get("open_set", {}).get("methods", {}).get(method, {}).get("by_shots", {})
    if not by_shot:
        return UNCALIBRATED
    return OpenSetCalibration.from_dict(by_shot[min(by_shot, key=lambda k: abs(int(k) - shots))])


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in :data:`TEMPERATURE_RANGE` minimising the mean NLL of ``softmax(logits / T)`` at ``labels``
    (``(n, N)`` raw logits of known-class queries, ``(n,)`` their classes); a 1-D bounded search on ``log T``."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z = np.asarray(logits, dtype=np.float64)
    true = z[np.arange(len(z)), labels]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - true / t))

    lo, hi = (math.log(v) for v in TEMPERATURE_RANGE)
    return float(math.exp(minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}).x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (%) of ``(n, N)`` probabilities: ``sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)|`` over
    ``bins`` equal-width bins of the top probability (Guo et al. 2017, 15 bins)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() / len(conf) * abs(correct[inside].mean() - conf[inside].mean())
    return float(total * 100.0)


def acceptance_thresholds(known_scores: np.ndarray) -> dict[float, float]:
    """``{acceptance: threshold}``: the score above which each :data:`ACCEPTANCE_LEVELS` fraction of the
    known validation queries lies (the ``1 - acceptance`` quantile)."""
    s = np.asarray(known_scores, dtype=np.float64)
    return {a: float(np.quantile(s, 1.0 - a)) for a in ACCEPTANCE_LEVELS}
