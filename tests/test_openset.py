"""Open-set episodes, the AUROC of the known-vs-unknown score, and rejection served over gRPC (issue 16)."""

import numpy as np
import pytest

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.openset import OpenSetSampler, auroc, evaluate_open_set

pytestmark = pytest.mark.unit


def test_auroc_is_the_probability_that_a_known_query_outscores_an_unknown_one():
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounded: ties occur
    pairs = [(k > u) + 0.5 * (k == u) for k in known for u in unknown]
    assert auroc(known, unknown) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0 and auroc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_open_episodes_keep_the_closed_task_and_add_unseen_classes(omniglot_test):
    sampler, closed = OpenSetSampler(omniglot_test, 5, 1, 3, seed=4), EpisodeSampler(omniglot_test, 5, 1, 3, seed=4)
    for i in range(5):
        ep, same = sampler.episode(i), closed.episode(i)
        assert np.array_equal(ep.known.support, same.support) and np.array_equal(ep.known.query, same.query)
        assert len(ep.unknown) == 15 and not set(ep.unknown_classes) & set(ep.known.classes)
        assert set(omniglot_test.labels[ep.unknown]) == set(ep.unknown_classes)
        assert np.array_equal(sampler.episode(i).unknown, ep.unknown)  # deterministic in (seed, i)


def test_open_set_evaluation_of_a_real_model(omniglot_model, omniglot_test):
    """A shipped Omniglot model tells unseen characters from enrolled ones far better than chance."""
    from fewshot.models.family import open_shipped

    model = open_shipped(omniglot_model, "onnxruntime", "cpu")
    adapter = model.adapter("centroid")
    result = evaluate_open_set(adapter, omniglot_test, lambda idx: model.spec.normalize(omniglot_test.images[idx]), 5, 1, 5, tasks=20)
    assert result.tasks == 20 and result.accuracy > 80 and 90 < result.auroc <= 100 and result.auroc_ci95 > 0
    assert result.score == adapter.open_set.score and result.temperature == adapter.open_set.temperature < 1
    assert 85 < result.acceptance <= 100 and 50 < result.rejection <= 100
    assert result.ece_after < result.ece_before  # temperature scaling: the raw distances are far too unsure


def test_fewshot_eval_open_set_reports_auroc(capsys):
    import json

    from fewshot.cli import main

    assert main(["eval", "--model", "omniglot-conv4-directsum", "--open-set", "--tasks", "3", "--queries", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["open_set"] and row["score"] in ("max_logit", "energy") and 0 <= row["auroc"] <= 100 and row["tasks"] == 3
    assert 0 <= row["acceptance"] <= 100 and 0 <= row["rejection"] <= 100 and row["ece_before"] >= 0 and row["ece_after"] >= 0
