"""Losses of the direct-sum paper (Kobayashi, "Direct-Sum Approach to Integrate Losses Via
Classifier Subspace"): classification losses (eqs. 1-2), metric losses (eqs. 3-4) and the three ways
to combine them: plain sum (eq. 6), direct sum (eqs. 7-8) and spectral sum (eqs. 9-11).

Shapes: features ``x`` are ``(n, d)``, labels ``y`` are ``(n,)`` int64, the classifier weight ``W``
is stored as ``nn.Linear.weight`` i.e. ``(C, d)`` (the paper's ``W`` is its transpose, ``d x C``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import ConfigError

ClsLoss = Literal["sce", "bce", "none"]
MetricLoss = Literal["nca", "proto", "none"]
Combine = Literal["sum", "directsum", "spectral"]

#: eq. (8): regulariser that keeps ``W^T W`` invertible.
DIRECT_SUM_EPS = 1e-3


def sce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """eq. (1): softmax cross-entropy, mean over the batch. ``logits (n, C)``."""
    return F.cross_entropy(logits, y)


def bce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """eq. (2): C one-vs-rest binary cross-entropies, summed over classes, mean over the batch."""
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` -> ``(n, n)`` squared Euclidean distances (clamped at 0)."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


def nca_loss(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """eq. (4): leave-one-out NCA. Anchors with no other sample of their class are skipped.

    ``temperature`` divides the squared distances (1.0 is the paper's form).
    """
    n = x.shape[0]
    logits = -_sq_dists(x) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    logits = logits.masked_fill(eye, float("-inf"))
    same = (y[:, None] == y[None, :]) & ~eye
    valid = same.any(1)
    if not valid.any():
        return x.sum() * 0.0
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    return (log_all - log_pos)[valid].mean()


def proto_loss(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """eq. (3): prototypical loss with leave-one-out prototypes.

    For anchor ``i`` the prototype of its own class excludes ``x_i``; other classes use their full
    mean. Anchors alone in their class are skipped.
    """
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    onehot = F.one_hot(inverse, len(classes)).to(x.dtype)  # (n, K)
    sums = onehot.T @ x  # (K, d)
    means = sums / counts[:, None].to(x.dtype)
    own_count = (counts[inverse] - 1).clamp_min(1).to(x.dtype)
    own_proto = (sums[inverse] - x) / own_count[:, None]  # (n, d), leave-one-out
    d_all = ((x[:, None, :] - means[None, :, :]) ** 2).sum(-1)  # (n, K)
    d_own = ((x - own_proto) ** 2).sum(-1)
    d_all = torch.where(onehot.bool(), d_own[:, None].expand_as(d_all), d_all)
    valid = counts[inverse] > 1
    if not valid.any():
        return x.sum() * 0.0
    loss = F.cross_entropy(-d_all / temperature, inverse, reduction="none")
    return loss[valid].mean()


def complement_projection(x: torch.Tensor, weight: torch.Tensor, eps: float = DIRECT_SUM_EPS) -> torch.Tensor:
    """eq. (8): ``W_perp W_perp^T x ~= x - W (W^T W + eps I)^-1 W^T x`` without forming ``W_perp``.

    Args:
        x: ``(n, d)`` features.
        weight: classifier weight ``(C, d)`` (rows are the paper's columns ``w_c``); needs ``d > C``.
    """
    w = weight.T  # (d, C): the paper's W
    d, c = w.shape
    if d <= c:
        raise ConfigError(
            f"the direct sum needs feature dim d > number of classes C, got d={d}, C={c}: "
            "use --combine spectral (eq. 11) or a backbone with more feature dimensions"
        )
    gram = w.T @ w + eps * torch.eye(c, dtype=w.dtype, device=w.device)  # (C, C)
    coeff = torch.linalg.solve(gram, w.T @ x.T)  # (C, n)
    return x - (w @ coeff).T


def spectral_projection(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """eqs. (9)-(11): ``W~ diag(1 - lambda~^p) W~^T x`` with ``W = W~ diag(lambda) V^T`` and
    ``lambda~ = lambda / max(lambda)`` zero-padded to ``d`` entries. ``p = 0`` keeps exactly the
    complement of ``span(W)`` (the direct sum when ``d > C``).
    """
    w = weight.T  # (d, C)
    d = w.shape[0]
    u, s, _ = torch.linalg.svd(w, full_matrices=True)  # u (d, d), s (min(d, C),)
    lam = torch.zeros(d, dtype=x.dtype, device=x.device)
    lam[: s.shape[0]] = s / s.max()
    # 0^0 is 1 in torch, but a zero singular value carries no classifier direction: weight it 1.
    keep = torch.where(lam > 0, 1.0 - lam.pow(p), torch.ones_like(lam))
    return ((x @ u) * keep) @ u.T


class CombinedLoss(nn.Module):
    """``l_cls`` on the classifier's logits plus ``l_metric`` on the features, combined by eq. (6),
    (7) or (11). The projection is built from the classifier weight *detached*: the classifier
    subspace is what ``l_cls`` learns, the metric term only shapes the features.
    """

    def __init__(
        self,
        cls: ClsLoss = "sce",
        metric: MetricLoss = "none",
        combine: Combine = "sum",
        p: float = 0.3,
        metric_weight: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if cls == "none" and metric == "none":
            raise ConfigError("at least one of the classification and metric losses is needed")
        self.cls, self.metric, self.combine, self.p = cls, metric, combine, p
        self.metric_weight, self.temperature = metric_weight, temperature

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The features the metric loss sees under this combination."""
        if self.combine == "sum":
            return x  # eq. (6)
        if self.combine == "directsum":
            return complement_projection(x, weight.detach())  # eq. (7)-(8)
        if self.combine == "spectral":
            return spectral_projection(x, weight.detach(), self.p)  # eq. (11)
        raise ConfigError(f"unknown combination {self.combine!r}: use sum, directsum or spectral")

    def forward(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "cls", "metric"}`` (scalars)."""
        zero = x.sum() * 0.0
        l_cls = {"sce": sce_loss, "bce": bce_loss}.get(self.cls, lambda *_: zero)(logits, y)
        if self.metric == "none":
            l_metric = zero
        else:
            fn = nca_loss if self.metric == "nca" else proto_loss
            l_metric = fn(self.project(x.float(), weight.float()), y, self.temperature)
        return {"loss": l_cls + self.metric_weight * l_metric, "cls": l_cls.detach(), "metric": l_metric.detach()}
