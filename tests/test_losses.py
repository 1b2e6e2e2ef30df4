"""Direct-sum paper losses: eqs. (1)-(11)."""

import pytest
import torch

from fewshot.models.losses import CombinedLoss, bce_loss, complement_projection, nca_loss, proto_loss, sce_loss, spectral_projection

pytestmark = pytest.mark.unit


def _full_rank(d: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, generator=g, dtype=torch.float64)  # nn.Linear layout (C, d)


def _span_fraction(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row: ||proj_span(W) g|| / ||g|| (the cosine between g and span(W))."""
    w = weight.T
    proj = w @ torch.linalg.solve(w.T @ w, w.T @ g.T)
    return proj.T.norm(dim=1) / g.norm(dim=1)


def test_complement_projection_annihilates_classifier_subspace():
    for d, c in ((64, 10), (256, 100), (1024, 120)):
        weight = _full_rank(d, c, seed=d)
        x = torch.randn(32, d, dtype=torch.float64)
        px = complement_projection(x, weight)
        ratio = (px @ weight.T).norm(dim=1) / (x @ weight.T).norm(dim=1)
        assert ratio.max() < 1e-3, ratio.max()


def test_metric_gradient_is_orthogonal_to_classifier_subspace_only_under_direct_sum():
    d, c = 64, 10
    weight = _full_rank(d, c)
    x = torch.randn(40, d, dtype=torch.float64)
    y = torch.arange(40) % 8
    for combine, orthogonal in (("directsum", True), ("sum", False)):
        loss = CombinedLoss("none", "nca", combine, temperature=float(d))
        xr = x.clone().requires_grad_(True)
        metric = loss(xr, torch.zeros(40, c, dtype=torch.float64), y, weight)["metric"]
        (grad,) = torch.autograd.grad(nca_loss(loss.project(xr, weight), y, float(d)), xr)
        assert metric > 0
        cos = _span_fraction(grad, weight)
        if orthogonal:
            assert cos.max() < 1e-3, cos.max()
        else:
            assert cos.mean() > 0.1, cos.mean()


def test_spectral_sum_with_p0_equals_direct_sum_when_d_exceeds_c():
    weight = _full_rank(128, 20)
    x = torch.randn(16, 128, dtype=torch.float64)
    direct = complement_projection(x, weight)
    spectral = spectral_projection(x, weight, p=0.0)
    assert torch.allclose(direct, spectral, atol=1e-4 * x.norm(dim=1).max())


def test_spectral_sum_keeps_a_complement_when_d_is_at_most_c():
    weight = _full_rank(32, 100)
    x = torch.randn(8, 32, dtype=torch.float64)
    out = spectral_projection(x, weight, p=0.3)
    assert 0 < out.norm() < x.norm()


def test_direct_sum_refuses_d_not_above_c():
    try:
        complement_projection(torch.randn(4, 16), torch.randn(20, 16))
    except ValueError as exc:
        assert "d > number of classes" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_losses_prefer_separated_classes():
    y = torch.arange(20) % 4
    centers = torch.eye(4, 8) * 4
    tight = centers[y] + 0.05 * torch.randn(20, 8)
    loose = torch.randn(20, 8)
    assert nca_loss(tight, y) < nca_loss(loose, y)
    assert proto_loss(tight, y) < proto_loss(loose, y)
    logits = (torch.nn.functional.one_hot(y, 4).float() * 2 - 1) * 10
    assert sce_loss(logits, y) < 1e-3 and bce_loss(logits, y) < 1e-3
    assert sce_loss(-logits, y) > 1 and bce_loss(-logits, y) > 1


def test_proto_loss_uses_leave_one_out_prototypes():
    # Each anchor's own prototype is the other point of its class; the other class uses its full mean.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.5, 0.0], [2.5, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    e3 = torch.log1p(torch.exp(torch.tensor(-3.0)))
    expected = (2 * e3 + 2 * torch.log(torch.tensor(2.0))) / 4
    assert torch.isclose(proto_loss(x, y), expected, atol=1e-6)


def test_nca_loss_is_leave_one_out():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    y = torch.tensor([0, 0, 1])
    # anchor 0: pos d=1, neg d=9; anchor 1: pos d=1, neg d=4; anchor 2 has no positive: skipped.
    expected = (torch.log1p(torch.exp(torch.tensor(-8.0))) + torch.log1p(torch.exp(torch.tensor(-3.0)))) / 2
    assert torch.isclose(nca_loss(x, y), expected, atol=1e-6)
