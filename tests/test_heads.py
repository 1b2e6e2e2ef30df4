"""Few-shot heads on real features of the shipped Omniglot backbone."""

import numpy as np
import pytest
import torch

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import open_shipped
from fewshot.models.heads.base import sq_distances
from fewshot.models.heads.centroid import CentroidHead
from fewshot.models.heads.laplacian_shot import LaplacianShotHead, rectify_prototypes
from fewshot.models.heads.transforms import transform_features

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def features(omniglot_model, omniglot_test):
    """Real features of 40 test classes (all 20 drawings each)."""
    idx = np.flatnonzero(omniglot_test.labels < 40)
    extract = open_shipped(omniglot_model, "onnxruntime", "cpu").extract
    feats = extract(omniglot_model.spec.normalize(omniglot_test.images[idx]))
    return feats, omniglot_test.subset(list(range(40)))


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("transform", ["UN", "L2N", "CL2N"])
def test_laplacian_energy_never_increases(features, omniglot_model, lam, transform):
    feats, data = features
    sampler = EpisodeSampler(data, 5, 1, 15, seed=1)
    head = LaplacianShotHead(lam, 3, transform, omniglot_model.center, rectify=False)
    for i in range(30):
        ep = sampler.episode(i)
        state = head.fit(feats[ep.support], torch.as_tensor(ep.support_labels))
        probs, e = state.assign(feats[ep.query])
        # classify is softmax(logits); the logits are log Y shifted per query, so softmax gives Y back
        # (to float32 rounding of exp(log Y - shift): 1.6e-6 measured on a 0.97 / 0.03 query)
        assert torch.allclose(probs, state.classify(feats[ep.query]), atol=1e-5)
        assert len(e) >= 1 and probs.shape == (75, 5)
        assert all(b <= a for a, b in zip(e, e[1:])), e
        assert torch.allclose(probs.sum(1), torch.ones(75), atol=1e-5)


def test_laplacian_shot_stops_within_20_iterations(features, omniglot_model):
    feats, data = features
    ep = EpisodeSampler(data, 5, 5, 15, seed=2).episode(0)
    state = LaplacianShotHead(1.0, 3, "CL2N", omniglot_model.center).fit(feats[ep.support], torch.as_tensor(ep.support_labels))
    assert 1 <= len(state.assign(feats[ep.query])[1]) <= 20


def test_rectified_prototypes_stay_aligned_with_their_classes():
    # Class 2's support point is far from every query: it receives only its own support point.
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    labels = torch.tensor([0, 1, 2])
    query = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.1, 1.0]])
    protos, _ = rectify_prototypes(support, labels, query, 3)
    nearest = torch.nn.functional.normalize(protos, dim=1) @ torch.nn.functional.normalize(support, dim=1).T
    assert nearest.argmax(1).tolist() == [0, 1, 2]


def test_centroid_is_batch_invariant_and_accurate_on_real_features(features, omniglot_model):
    feats, data = features
    ep = EpisodeSampler(data, 5, 1, 15, seed=3).episode(0)
    state = CentroidHead("CL2N", omniglot_model.center).fit(feats[ep.support], torch.as_tensor(ep.support_labels))
    together = state.classify(feats[ep.query])
    alone = torch.cat([state.classify(feats[ep.query][i : i + 1]) for i in range(len(ep.query))])
    assert torch.equal(together, alone)
    assert (together.argmax(1).numpy() == ep.query_labels).mean() > 0.8


@pytest.mark.parametrize("classes", [2, 5, 20, 200])
def test_squared_distances_in_blocks_equal_the_whole_broadcast_row_by_row(features, classes):
    """sq_distances goes through the queries in blocks sized by the number of classes (200 classes: one query a
    block): every entry is exactly the broadcast form's, and a query's row is the same alone or with others."""
    feats, _ = features
    query, prototypes = feats[:75], feats[100 : 100 + classes]
    whole = ((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
    got = sq_distances(query, prototypes)
    assert torch.equal(got, whole)
    assert torch.equal(torch.cat([sq_distances(query[i : i + 1], prototypes) for i in range(len(query))]), got)
    assert sq_distances(query[:0], prototypes).shape == (0, classes)
    assert sq_distances(query, prototypes[:0]).shape == (75, 0)


def test_heads_reject_bad_support():
    head = CentroidHead("L2N")
    with pytest.raises(ValueError, match="at least 2 classes"):
        head.fit(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"classes \[1\] have no support image"):
        head.fit(torch.zeros(3, 4), torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="centering vector"):
        transform_features(torch.zeros(2, 4), "CL2N", None)
    with pytest.raises(ValueError, match="unknown feature transform"):
        CentroidHead("XYZ")
