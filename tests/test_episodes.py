"""The seeded N-way K-shot Q-query sampler, on real Omniglot."""

import numpy as np
import pytest

from fewshot.models.episodes import EpisodeSampler

pytestmark = pytest.mark.unit


def test_no_class_in_two_roles_and_no_image_in_support_and_query(omniglot_test):
    sampler = EpisodeSampler(omniglot_test, ways=20, shots=5, queries=15, seed=3)
    for i in range(200):
        ep = sampler.episode(i)
        assert len(set(ep.classes.tolist())) == 20
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert len(set(ep.support.tolist())) == 100 and len(set(ep.query.tolist())) == 300
        # every image sits in the class its episode label says, and no class serves two labels
        assert (omniglot_test.labels[ep.support] == ep.classes[ep.support_labels]).all()
        assert (omniglot_test.labels[ep.query] == ep.classes[ep.query_labels]).all()


def test_same_seed_same_tasks_other_seed_other_tasks(omniglot_test):
    a = EpisodeSampler(omniglot_test, 5, 1, 15, seed=7)
    b = EpisodeSampler(omniglot_test, 5, 1, 15, seed=7)
    c = EpisodeSampler(omniglot_test, 5, 1, 15, seed=8)
    assert all(np.array_equal(a.episode(i).query, b.episode(i).query) for i in range(20))
    # task i does not depend on which tasks were drawn before it
    assert np.array_equal(a.episode(19).support, EpisodeSampler(omniglot_test, 5, 1, 15, seed=7).episode(19).support)
    assert not all(np.array_equal(a.episode(i).support, c.episode(i).support) for i in range(20))


def test_refuses_impossible_episodes(omniglot_test):
    with pytest.raises(ValueError, match="at least 21 images"):
        EpisodeSampler(omniglot_test, 5, 6, 15)  # Omniglot has 20 drawings per character
    with pytest.raises(ValueError, match="ways must be at least 2"):
        EpisodeSampler(omniglot_test, 1, 1, 1)
