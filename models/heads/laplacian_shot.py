"""LaplacianShot (Ziko et al., "Laplacian Regularized Few-Shot Learning", ICML 2020). Transductive.

Minimises over soft assignments ``Y`` of the queries
``E(Y) = sum_q sum_c Y_qc log Y_qc + Y_qc a_qc - lambda sum_q sum_c (W Y)_qc Y_qc``
with unary ``a_qc = ||x_q - m_c||^2`` (``m_c`` the class prototypes, optionally rectified) and a
binary kNN affinity ``W`` among the query features, by the bound updates
``Y <- softmax(-a + lambda W Y)``. Details follow the authors' code (see ``../shared/METHODS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Any

import torch

from fewshot.errors import ConfigError
from fewshot.models.heads.base import FewShotHead, HeadState, check_support, class_means, nearest_shot, sq_distances
from fewshot.models.heads.transforms import transform_features
from fewshot.models.settings import Setting

if TYPE_CHECKING:
    from fewshot.models.tuning import TuningTasks

#: The lambda grid: the authors' grid (../shared/METHODS.md) extended downwards, since on Conv-4 features
#: the small values win on validation.
LAMBDA_GRID = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)
#: The largest lambda a request may ask for.
MAX_LAMBDA = 1000.0


def knn_affinity(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(Q, d)`` -> ``(Q, Q)`` kNN affinity, symmetrised: ``W = (B + B^T) / 2`` with ``B_ij = 1`` when
    ``j`` is among the ``k`` nearest of ``i``, the point itself counted (so ``k = 3`` gives two
    neighbours). The authors' code uses ``B`` itself; the symmetric form makes ``W Y`` the exact
    gradient of the pairwise term, so the energy below is the one the bound updates minimise."""
    k = min(k, x.shape[0])
    sq = (x * x).sum(1)
    # The Gram form is 100x cheaper than broadcasting (Q, Q, d); the graph is per request anyway.
    dist = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    dist.fill_diagonal_(float("-inf"))  # the point itself is always among its k nearest
    idx = dist.topk(k, dim=1, largest=False).indices
    b = torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype).scatter_(1, idx, 1.0)
    return 0.5 * (b + b.T)


def rectify_prototypes(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype rectification of the authors' code: shift the queries by
    ``mean(support) - mean(query)``, assign support and shifted queries to the support means by
    cosine, weight each point by ``softmax(10 cos)`` of its class, new prototype = mean of the
    weighted points assigned to it (a class that receives no point keeps its support mean).

    Returns ``(prototypes (N, d), shifted query (Q, d))``.
    """
    means = class_means(support, labels, n)
    query = query + (support.mean(0) - query.mean(0))
    points = torch.cat([support, query])
    cos = torch.nn.functional.normalize(points, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
    weights = torch.softmax(10.0 * cos, dim=1)
    assigned = cos.argmax(1)
    protos = means.clone()
    for c in range(n):  # row c is class c, whether or not it received points
        mask = assigned == c
        if mask.any():
            protos[c] = (weights[mask, c : c + 1] * points[mask]).mean(0)
    return protos, query


def laplacian_energy(y: torch.Tensor, unary: torch.Tensor, w: torch.Tensor, lam: float) -> float:
    """``sum(Y log Y + a Y) - (lambda / 2) sum((W Y) Y)``: the objective whose linearised bound the
    update ``softmax(-a + lambda W Y)`` minimises exactly."""
    return float((y * torch.log(y.clamp_min(1e-20)) + unary * y - 0.5 * lam * (w @ y) * y).sum())


def laplacian_shot(
    prototypes: torch.Tensor, query: torch.Tensor, lam: float, knn: int = 3, max_iter: int = 20, tol: float = 1e-6
) -> tuple[torch.Tensor, list[float]]:
    """Bound updates of LaplacianShot.

    Args:
        prototypes: ``(N, d)``; query: ``(Q, d)`` (same feature space).
    Returns:
        ``Y (Q, N)`` soft assignments and the energy after each update. Stops after at most
        ``max_iter`` updates, or (from the second update on) once the relative energy change is at
        most ``tol``.
    """
    unary = sq_distances(query, prototypes)
    w = knn_affinity(query, knn)
    y = torch.softmax(-unary, dim=1)
    energy = laplacian_energy(y, unary, w, lam)
    energies: list[float] = []
    for it in range(max_iter):
        candidate = torch.softmax(-unary + lam * (w @ y), dim=1)
        new_energy = laplacian_energy(candidate, unary, w, lam)
        # The kNN affinity is not positive semi-definite, so the bound is not guaranteed to hold.
        # The update direction is still a descent direction of E (it minimises a convex function
        # with E's gradient at y), so a backtracking step along it restores E(t+1) <= E(t).
        step = 1.0
        while new_energy > energy and step > 1e-4:
            step *= 0.5
            candidate = y + step * (torch.softmax(-unary + lam * (w @ y), dim=1) - y)
            new_energy = laplacian_energy(candidate, unary, w, lam)
        if new_energy > energy:
            break  # no decrease along the update: y is stationary to numerical precision
        y, energy = candidate, new_energy
        energies.append(energy)
        if it >= 1 and abs(energies[-1] - energies[-2]) <= tol * abs(energies[-2]):
            break
    return y, energies


@dataclass
class LaplacianShotState(HeadState):
    """Support features of one task; each ``classify`` call is transductive over its own queries."""

    support: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    transform: str
    center: torch.Tensor | None
    lam: float
    knn: int
    rectify: bool
    kind = "laplacianshot"
    transductive = True

    def assign(self, query: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """``(Q, d)`` -> ``(Q, N)`` soft assignments after the bound updates, and the energy after each
        update. Pure: the state is shared by concurrent calls (the server's task cache)."""
        return self._assign(transform_features(query, self.transform, self.center))

    def _assign(self, q: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """:meth:`assign` of already transformed query features."""
        if self.rectify:
            protos, q = rectify_prototypes(self.support, self.labels, q, self.n_classes)
        else:
            protos = class_means(self.support, self.labels, self.n_classes)
        return laplacian_shot(protos, q, self.lam, self.knn)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, d)`` -> ``(Q, N)``: ``log Y`` of the soft assignments minus the query's smallest squared
        distance to the support means (the unrectified, unshifted unary of the query alone): ``softmax``
        gives ``Y`` back, and the max-logit and energy scores say how far the query is from every class,
        which ``Y`` (rows summing to one, pulled towards the classes by the other queries) cannot: on the
        Omniglot model's validation episodes (its card's ``open_set`` block, ``fewshot calibrate``) the
        energy of these logits separates distractors at 94.7 / 97.5 AUROC (1 / 5 shots), the maximum of
        ``Y`` at 81.0 / 85.2. The rectified prototypes are not used for the distance: rectification
        shifts every query by the support-query mean difference, which distractors bias."""
        q = transform_features(query, self.transform, self.center)
        y = self._assign(q)[0]
        unary = sq_distances(q, class_means(self.support, self.labels, self.n_classes))
        return torch.log(y.clamp_min(torch.finfo(y.dtype).tiny)) - unary.min(1, keepdim=True).values


class LaplacianShotHead(FewShotHead):
    """LaplacianShot with a feature transform; ``lam`` is chosen per model and shot count on
    validation tasks and stored in the model card."""

    name = "laplacianshot"
    settings = {"lambda": Setting("lambda", "lam", 0.0, MAX_LAMBDA)}

    def __init__(
        self, lam: float = 1.0, knn: int = 3, transform: str = "CL2N", center: torch.Tensor | None = None, rectify: bool = False
    ) -> None:
        if lam < 0 or knn < 1:
            raise ConfigError(f"lambda must be >= 0 and knn >= 1, got lambda={lam}, knn={knn}")
        self.lam, self.knn, self.transform, self.center, self.rectify = lam, knn, transform, center, rectify

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> LaplacianShotState:
        n = check_support(support, labels)
        s = transform_features(support, self.transform, self.center)
        return LaplacianShotState(s, labels, n, self.transform, self.center, self.lam, self.knn, self.rectify)

    @classmethod
    def from_card(cls, cfg: dict[str, Any], shots: int, center: torch.Tensor | None, **settings: Any) -> LaplacianShotHead:
        """lambda: the one tuned for the nearest tuned shot count, unless the request gives one."""
        lam = settings.get("lam")
        return cls(
            lam=float(nearest_shot(cfg["lambda"], shots) if lam is None else lam),
            knn=int(cfg["knn"]),
            transform=settings.get("transform") or cfg["transform"],
            center=center,
            rectify=bool(cfg["rectify"]),
        )

    @classmethod
    def tune(cls, val: TuningTasks) -> tuple[dict[str, Any], dict[str, float]]:
        """lambda per shot count over :data:`LAMBDA_GRID`; rectification on or off for every shot count
        (whichever sums to more accuracy), under the model's transform, with ``knn = 3``."""
        scores = {
            (shots, lam, rect): val.accuracy(cls(lam, 3, val.transform, val.center, rect), shots)
            for shots in (1, 5)
            for lam, rect in product(LAMBDA_GRID, (False, True))
        }
        rect = max((False, True), key=lambda r: sum(v for (_, _, rr), v in scores.items() if rr == r))
        lam = {str(shots): max(LAMBDA_GRID, key=lambda l: scores[(shots, l, rect)]) for shots in (1, 5)}
        block = {"knn": 3, "lambda": lam, "transform": val.transform, "rectify": rect, "lambda_grid": list(LAMBDA_GRID)}
        return block, {f"laplacianshot_{s}shot": scores[(s, lam[str(s)], rect)] for s in (1, 5)}

    def describe(self) -> dict[str, Any]:
        return {"transform": self.transform, "lambda": self.lam, "rectify": self.rectify}
