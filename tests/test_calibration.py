"""Temperature scaling, the ECE, open-set scores and thresholds (fewshot.models.calibration)."""

import numpy as np
import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.models.calibration import (
    ACCEPTANCE_LEVELS,
    SCORES,
    UNCALIBRATED,
    OpenSetCalibration,
    acceptance_thresholds,
    calibration_for,
    expected_calibration_error,
    fit_temperature,
)

pytestmark = pytest.mark.unit


def _sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): the fitted T should be ``temperature``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes))
    p = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("temperature", [0.2, 1.0, 4.0])
def test_temperature_scaling_recovers_the_temperature_labels_were_drawn_with(temperature):
    logits, labels = _sampled(temperature)
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.08)


def test_ece_is_zero_for_calibrated_probabilities_and_large_for_overconfident_ones():
    logits, labels = _sampled(2.0, n=50000)
    calibrated = torch.softmax(torch.from_numpy(logits / 2.0), 1).numpy()
    overconfident = torch.softmax(torch.from_numpy(logits * 5.0), 1).numpy()
    assert expected_calibration_error(calibrated, labels) < 1.5
    assert expected_calibration_error(overconfident, labels) > 20
    # one bin by hand: every top probability 0.9, half of them right -> |0.5 - 0.9| = 40 %
    probs = np.tile([[0.9, 0.1]], (10, 1))
    assert expected_calibration_error(probs, np.array([0, 1] * 5)) == pytest.approx(40.0)


def test_scores_rank_a_confident_query_above_a_far_one():
    near, far = torch.tensor([[-0.1, -3.0, -3.2]]), torch.tensor([[-2.0, -2.1, -2.2]])
    for name, score in SCORES.items():
        assert score(near).item() > score(far).item(), name
    assert SCORES["max_logit"](near).item() == pytest.approx(-0.1)
    assert SCORES["energy"](near).item() == pytest.approx(torch.logsumexp(near, 1).item())


def test_thresholds_accept_their_fraction_and_interpolate_between_levels():
    scores = np.random.default_rng(1).normal(size=100000)
    thresholds = acceptance_thresholds(scores)
    for level in ACCEPTANCE_LEVELS:
        assert (scores >= thresholds[level]).mean() == pytest.approx(level, abs=2e-3)
    cal = OpenSetCalibration(0.5, "max_logit", thresholds)
    assert cal.threshold() == thresholds[0.95]
    assert thresholds[0.9] > cal.threshold(0.92) > thresholds[0.95]
    with pytest.raises(ConfigError, match="0.5..0.99"):
        cal.threshold(0.999)
    with pytest.raises(ConfigError, match="without open-set calibration"):
        UNCALIBRATED.threshold()


def test_calibration_round_trips_and_is_looked_up_at_the_nearest_shot_count():
    cal = OpenSetCalibration(0.25, "energy", {0.95: -1.5, 0.5: 0.25})
    assert OpenSetCalibration.from_dict(cal.to_dict()) == cal
    assert OpenSetCalibration.from_dict(None) == UNCALIBRATED
    manifest = {"open_set": {"methods": {"centroid": {"by_shots": {"1": cal.to_dict(), "5": UNCALIBRATED.to_dict()}}}}}
    assert calibration_for(manifest, "centroid", 2) == cal and calibration_for(manifest, "centroid", 4) == UNCALIBRATED
    assert calibration_for(manifest, "logreg", 1) == UNCALIBRATED and calibration_for({}, "centroid", 1) == UNCALIBRATED
    torch.testing.assert_close(cal.calibrate(torch.tensor([[1.0, 2.0]])), torch.tensor([[4.0, 8.0]]))
    with pytest.raises(ConfigError):
        OpenSetCalibration(0.0)
    with pytest.raises(ConfigError):
        OpenSetCalibration(1.0, "entropy")
