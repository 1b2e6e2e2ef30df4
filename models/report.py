"""The support-set report (issue 37): how well a task is expected to work, and which support images hurt it.

Everything here is read from **held-out predictions** of the support set: each support image classified by
the task adapted *without* it (:class:`HeldOut`, ``(S, N)`` calibrated probabilities).

- Metric heads hold out one image at a time (leave-one-out), on the features of the one backbone pass the
  Adapt makes: the nearest centroid in closed form (the class mean without image ``i`` is
  ``(n_y m_y - x_i) / (n_y - 1)``: no refit, no extra backbone pass); other heads refit once per shot
  (leave-one-shot-out: fold ``k`` holds out the ``k``-th image of every class), ``shots`` head fits.
- Inner-loop models hold out half the shots of every class at a time (2-fold): two inner loops, each on
  half the support set, so the report costs about one more Adapt.
- A class with one image cannot be held out (its class would vanish): at 1 shot there is no estimate,
  and the report says so.
- Optionally, **unlabeled images** of the kinds the task will be asked about (never scored, no labels): the
  task's mean highest probability on them enters the estimate (its own map, :attr:`ReportSettings.unlabeled`),
  and they join the class means as soft members (:func:`unlabeled_members`) the mislabel score is measured
  against. On Tiny ImageNet the support set alone cannot get the estimate under 6 points (RESULTS.md, "How far
  the support set alone can go"); 15 unlabeled images per class do.

From those predictions:

- **estimate** of the task's accuracy on new queries (percent) with a 95% interval: the mean held-out
  probability of the true class and the held-out 0/1 accuracy, combined by the model's own linear map
  fitted on validation tasks (:class:`EstimateMap`, the card's ``report`` block), which also removes the
  bias of adapting on fewer shots; without a map, the held-out 0/1 accuracy;
- **confusions**: the class pairs with the most held-out probability on each other;
- **flags** per image: ``mislabel`` (the support set explains itself better, held out, with the image
  relabelled: :func:`mislabel_scores` above :data:`MISLABEL_GAIN`), ``duplicate`` (the same decoded pixels as an earlier image),
  ``near_duplicate`` (centred pixel cosine at least :data:`NEAR_DUPLICATE_COSINE`, e.g. the same photo
  re-encoded), ``outlier`` (farther from its class mean, in the model's feature space, than
  :data:`OUTLIER_RATIO` times the task's median such distance).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Relabelling gain (nats of held-out log-likelihood, :func:`mislabel_scores`) above which an image is flagged as
#: a probable mislabel.
MISLABEL_GAIN = 2.0
#: Temperature of the held-out nearest-centroid likelihood on unit-normalised features that the gain is measured in.
RELABEL_TEMPERATURE = 0.1
#: Images (those with the largest held-out margin) tried with another label: the bound on the flag's cost.
RELABEL_CANDIDATES = 128
#: Candidates scored together (memory: ``RELABEL_CHUNK * S * N`` doubles).
RELABEL_CHUNK = 16
#: Centred pixel cosine (on images averaged down to ``DUPLICATE_GRID`` squared cells) at or above which two
#: support images are near duplicates.
NEAR_DUPLICATE_COSINE = 0.98
DUPLICATE_GRID = 32
#: Distance to the class mean (without the image) over the task's median such distance, above which an
#: image is an outlier.
OUTLIER_RATIO = 2.0
#: Class pairs reported as the most confused.
TOP_CONFUSIONS = 3
#: Soft k-means of the unlabeled images around the class means (:func:`unlabeled_members`): the temperature of their
#: assignments (squared distance of unit-normalised features) and the refinement rounds; picked in an exploratory
#: comparison (temperatures 0.1 / 0.2 / 0.5, 1 / 3 / 6 rounds, Tiny ImageNet centroid) that is not kept in the repo.
UNLABELED_TEMPERATURE = 0.2
UNLABELED_ROUNDS = 3


@dataclass(frozen=True)
class HeldOut:
    """Held-out predictions of a support set: ``probabilities (S, N)`` calibrated, each row from a task adapted
    without that image (NaN rows: not held out, the only image of its class); the scheme and how many extra
    adaptations it took (head refits or inner loops; 0 for the closed-form centroid)."""

    probabilities: torch.Tensor
    scheme: str
    adaptations: int

    @property
    def held(self) -> torch.Tensor:
        """``(S,)`` bool: which images were held out."""
        return ~torch.isnan(self.probabilities).any(1)


def shot_ranks(labels: torch.Tensor) -> torch.Tensor:
    """``(S,)`` labels -> ``(S,)`` each image's rank among the images of its class (0 for the first)."""
    ranks = torch.zeros_like(labels)
    seen: dict[int, int] = {}
    for i, y in enumerate(labels.tolist()):
        ranks[i] = seen.get(y, 0)
        seen[y] = int(ranks[i]) + 1
    return ranks


def fold_ids(labels: torch.Tensor, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``((S,) fold of each image, (S,) bool holdable)``: images of classes with at least 2 images are spread over
    ``folds`` folds by their rank in the class, so every fold leaves each class at least one image."""
    counts = torch.bincount(labels)
    holdable = counts[labels] >= 2
    return shot_ranks(labels) % folds, holdable


def k_fold(adapter: Any, support: torch.Tensor, labels: torch.Tensor, folds: int = 2) -> HeldOut:
    """Held-out predictions by ``folds`` adaptations of ``adapter``, each on the support set less one fold
    (images of 1-image classes are never held out). ``(S, C, H, W)`` normalised images, ``(S,)`` labels."""
    n = int(labels.max()) + 1
    probs = torch.full((len(labels), n), float("nan"))
    fold, holdable = fold_ids(labels, folds)
    runs = 0
    for f in range(folds):
        out = holdable & (fold == f)
        if not out.any():
            continue
        task = adapter.adapt(support[~out], labels[~out])
        probs[out] = task.classify(support[out]).float().cpu()
        runs += 1
    return HeldOut(probs, f"{folds}-fold" if runs else "none", runs)


@dataclass(frozen=True)
class EstimateMap:
    """A model's map from held-out statistics to its accuracy on new queries, fitted on validation tasks:
    ``estimate = a * mean held-out probability of the true class + b * held-out 0/1 accuracy + u * confidence + c``,
    clipped to 0..1 (``confidence``: the task's mean highest probability on the request's unlabeled images; ``u`` is
    0 in a map fitted without them), and the spread ``sd`` of the validation tasks' accuracies around it (what the
    interval adds to the estimate's own sampling error). ``tasks``: how many validation tasks it was fitted on."""

    a: float = 0.0
    b: float = 1.0
    c: float = 0.0
    sd: float = 0.0
    tasks: int = 0
    u: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c, "sd": self.sd, "tasks": self.tasks, **({"u": self.u} if self.u else {})}

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> EstimateMap:
        if not d:
            return EstimateMap()
        return EstimateMap(float(d["a"]), float(d["b"]), float(d["c"]), float(d["sd"]), int(d["tasks"]), float(d.get("u", 0.0)))

    @staticmethod
    def fit(
        p_true: Sequence[float], loo: Sequence[float], accuracy: Sequence[float], confidence: Sequence[float] | None = None
    ) -> EstimateMap:
        """Least squares of per-task ``accuracy`` (fractions) on ``(p_true, loo, 1)``, and ``confidence`` where given."""
        columns = [p_true, loo] + ([confidence] if confidence is not None else [])
        x = np.column_stack([*columns, np.ones(len(p_true))])
        y = np.asarray(accuracy, dtype=np.float64)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        residual = y - np.clip(x @ coef, 0.0, 1.0)
        u = float(coef[2]) if confidence is not None else 0.0
        return EstimateMap(float(coef[0]), float(coef[1]), float(coef[-1]), float(residual.std()), len(y), u)

    def __call__(self, p_true: float, loo: float, confidence: float = 0.0) -> float:
        return float(min(1.0, max(0.0, self.a * p_true + self.b * loo + self.u * confidence + self.c)))


#: The map of a model without a fitted one: the held-out 0/1 accuracy itself.
IDENTITY_MAP = EstimateMap()


@dataclass(frozen=True)
class ReportSettings:
    """What a model's report runs with for one method and shot count: the estimate map and the mislabel
    threshold, both chosen on validation tasks (``fewshot report --write-card``: the card's ``report`` block,
    ``{"methods": {METHOD: {"by_shots": {SHOTS: map}, "mislabel_gain": threshold}}}``). ``unlabeled``: the
    settings of a report given unlabeled images (``by_shots_unlabeled``, ``mislabel_gain_unlabeled``; ``None``
    where the card has none: such a report uses the support-set settings and leaves the images out of the estimate)."""

    mapping: EstimateMap = IDENTITY_MAP
    mislabel_gain: float = MISLABEL_GAIN
    unlabeled: ReportSettings | None = None
    #: The mislabel threshold is on the standardised gain (:func:`standardized`), as for reports given unlabeled
    #: images, not on the gain in nats.
    standardize: bool = False

    @staticmethod
    def for_manifest(manifest: Mapping[str, Any], method: str, shots: int) -> ReportSettings:
        """The card's (or manifest's) settings of ``method`` at the nearest fitted shot count (defaults where none)."""
        block = manifest.get("report", {}).get("methods", {}).get(method, {})

        def nearest(key: str) -> EstimateMap | None:
            by_shot = block.get(key, {})
            return EstimateMap.from_dict(by_shot[min(by_shot, key=lambda k: abs(int(k) - shots))]) if by_shot else None

        with_images = nearest("by_shots_unlabeled")
        unlabeled = (
            None
            if with_images is None
            else ReportSettings(with_images, float(block.get("mislabel_gain_unlabeled", MISLABEL_GAIN)), standardize=True)
        )
        return ReportSettings(nearest("by_shots") or IDENTITY_MAP, float(block.get("mislabel_gain", MISLABEL_GAIN)), unlabeled)


@dataclass(frozen=True)
class Flag:
    """One support image's flag: ``kind`` (mislabel, duplicate, near_duplicate, outlier), its score (the
    relabelling gain, the pixel cosine, or the distance ratio), its given class (an index into the task's labels)
    and, where it applies, the other image (a
    duplicate's original) or the class it looks like (a mislabel's most probable class, an index into the
    task's labels)."""

    index: int
    kind: str
    score: float
    label: int
    other: int | None = None
    looks_like: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "kind": self.kind, "score": round(self.score, 6), "label": self.label}
        if self.other is not None:
            d["other"] = self.other
        if self.looks_like is not None:
            d["looks_like"] = self.looks_like
        return d


@dataclass(frozen=True)
class Report:
    """A task's support-set report (percentages; ``estimate`` ``None`` when no image could be held out).
    ``confusions``: ``(class a, class b, percent)`` by label index, most confused first."""

    estimate: float | None
    low: float | None
    high: float | None
    scheme: str
    held_out: int
    extra_adaptations: int
    note: str = ""
    confusions: list[tuple[int, int, float]] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    #: Held-out statistics behind the estimate (fractions): mean probability of the true class, 0/1 accuracy.
    p_true: float | None = None
    loo_accuracy: float | None = None
    #: Unlabeled images the request sent with the support set, and the task's mean highest probability on them
    #: (a fraction; ``None`` without them).
    unlabeled: int = 0
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731  (a one-line local helper)
        return {
            "estimate": r(self.estimate),
            "low": r(self.low),
            "high": r(self.high),
            "scheme": self.scheme,
            "held_out": self.held_out,
            "extra_adaptations": self.extra_adaptations,
            "note": self.note,
            "confusions": [[a, b, round(p, 4)] for a, b, p in self.confusions],
            "flags": [f.to_dict() for f in self.flags],
            "p_true": r(self.p_true),
            "loo_accuracy": r(self.loo_accuracy),
            "unlabeled": self.unlabeled,
            "confidence": r(self.confidence),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Report:
        return Report(
            d.get("estimate"),
            d.get("low"),
            d.get("high"),
            str(d.get("scheme", "")),
            int(d.get("held_out", 0)),
            int(d.get("extra_adaptations", 0)),
            str(d.get("note", "")),
            [(int(a), int(b), float(p)) for a, b, p in d.get("confusions", [])],
            [
                Flag(int(f["index"]), str(f["kind"]), float(f["score"]), int(f["label"]), f.get("other"), f.get("looks_like"))
                for f in d.get("flags", [])
            ],
            d.get("p_true"),
            d.get("loo_accuracy"),
            int(d.get("unlabeled", 0)),
            d.get("confidence"),
        )


def _per_image(held: HeldOut, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``((n,) held-out probability of each held-out image's true class, (n,) 1.0 where it was predicted right)``,
    or ``None`` when no image was held out."""
    rows = held.held
    if not rows.any():
        return None
    p, y = held.probabilities[rows].double(), labels[rows]
    return p[torch.arange(len(y)), y], (p.argmax(1) == y).double()


def estimate(
    held: HeldOut, labels: torch.Tensor, mapping: EstimateMap = IDENTITY_MAP, confidence: float = 0.0
) -> tuple[float, float, float, float, float] | None:
    """``(estimate, low, high, p_true, loo)`` as fractions, or ``None`` when nothing was held out (``p_true``: the mean
    held-out probability of the true class, ``loo``: the held-out 0/1 accuracy; ``confidence``: the unlabeled images'
    mean highest probability, for a map fitted with them). The interval is
    ``1.96 * sqrt(se^2 + sd^2)``: ``se`` the estimate's sampling error over the held-out images (the map applied
    to each image's own statistics), ``sd`` the map's residual spread on validation tasks."""
    per_image = _per_image(held, labels)
    if per_image is None:
        return None
    p_true, correct = per_image
    value = mapping(float(p_true.mean()), float(correct.mean()), confidence)
    count = len(p_true)
    se = float((mapping.a * p_true + mapping.b * correct).std(unbiased=True)) / math.sqrt(count) if count > 1 else 0.5
    half = 1.96 * math.sqrt(se * se + mapping.sd * mapping.sd)
    return value, max(0.0, value - half), min(1.0, value + half), float(p_true.mean()), float(correct.mean())


def confusions(held: HeldOut, labels: torch.Tensor, top: int = TOP_CONFUSIONS) -> list[tuple[int, int, float]]:
    """The ``top`` class pairs ``(a, b, percent)`` with the most held-out probability on each other: the mean
    over held-out images of class ``a`` of ``p_b``, averaged with the same for ``b``'s images on ``a``."""
    rows = held.held
    if not rows.any():
        return []
    p, y = held.probabilities[rows].double(), labels[rows]
    n = held.probabilities.shape[1]
    onehot = torch.nn.functional.one_hot(y, n).double()
    counts = onehot.sum(0)
    mass = (onehot.T @ p) / counts.clamp_min(1)[:, None]  # (N, N): mean probability class a's images give class b
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            both = [m for m, c in ((mass[a, b], counts[a]), (mass[b, a], counts[b])) if c > 0]
            if both:
                pairs.append((a, b, float(sum(both) / len(both)) * 100.0))
    return sorted(pairs, key=lambda t: -t[2])[:top]


def _class_distances(e: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(S, d)`` images, ``(S,)`` labels and the classes' ``(N, d)`` sums and ``(N,)`` counts (the images', plus any
    soft members') -> ``(S, N)`` squared distances of each image to each class mean, its own class's mean taken
    without it (for the only member of a class that column is meaningless: callers drop it)."""
    dist = torch.cdist(e, sums / counts.clamp_min(1)[:, None]) ** 2
    others = counts[labels] - 1
    without = (sums[labels] - e) / torch.where(others > 0, others, torch.ones_like(others))[:, None]
    dist[torch.arange(len(labels)), labels] = ((e - without) ** 2).sum(1)
    return dist


def centroid_distances(e: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """``(S, d)``, ``(S,)`` -> ``(S, N)`` squared distances of each image to each class mean, its own class's mean
    taken without it (leave-one-out; NaN for the only image of a class)."""
    onehot = torch.nn.functional.one_hot(labels, n).to(e.dtype)
    dist = _class_distances(e, labels, onehot.T @ e, onehot.sum(0))
    dist[torch.bincount(labels, minlength=n)[labels] < 2] = float("nan")
    return dist


def _log_likelihood(dist: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over held-out rows of ``log softmax(-dist / T)`` at each row's label (NaN rows left out)."""
    rows = ~torch.isnan(dist).any(1)
    lp = torch.log_softmax(-dist[rows] / temperature, dim=1)
    return lp[torch.arange(int(rows.sum())), labels[rows]].sum()


def unlabeled_members(
    embeddings: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, d)`` support and ``(U, d)`` unlabeled features, ``(S,)`` labels -> ``((N, d) sum, (N,) count)`` of the
    unlabeled images as soft members of each class: soft k-means on unit-normalised features, started from the
    support class means (:data:`UNLABELED_ROUNDS` rounds at :data:`UNLABELED_TEMPERATURE`), float64."""
    n = int(labels.max()) + 1 if n is None else n
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    u = torch.nn.functional.normalize(unlabeled.double(), dim=1)
    onehot = torch.nn.functional.one_hot(labels, n).to(e.dtype)
    sums, counts = onehot.T @ e, onehot.sum(0)
    means = sums / counts.clamp_min(1)[:, None]
    usum, ucount = torch.zeros_like(sums), torch.zeros_like(counts)
    for _ in range(UNLABELED_ROUNDS):
        w = torch.softmax(-(torch.cdist(u, means) ** 2) / UNLABELED_TEMPERATURE, dim=1)  # (U, N)
        usum, ucount = w.T @ u, w.sum(0)
        means = (sums + usum) / (counts + ucount).clamp_min(1e-12)[:, None]
    return usum, ucount


def mislabel_scores(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = RELABEL_TEMPERATURE,
    candidates: int = RELABEL_CANDIDATES,
    unlabeled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((S,) score, (S,) the class it looks like)``: how much better (nats) the support set explains itself when
    the image is relabelled to its most likely other class. Each image is held out against the class means of
    the unit-normalised features ``(S, d)`` (the closed-form leave-one-out of the nearest centroid, at
    ``temperature``), and the score is the gain in that held-out log-likelihood summed over *all* images: a
    mislabelled image both fits its given class badly and spoils the class it was put in. Only the
    ``candidates`` images with the largest held-out margin are tried (the rest score 0), each with one
    alternative class, so the cost is ``O(candidates * S * (d + N))``, in chunks of :data:`RELABEL_CHUNK`. Images of
    1-image classes score NaN. With ``unlabeled`` ``(U, d)`` features, the class means also hold the unlabeled images as
    soft members (:func:`unlabeled_members`, fixed while images are relabelled): better means, a sharper score."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    n, size = int(labels.max()) + 1, len(labels)
    onehot = torch.nn.functional.one_hot(labels, n).to(e.dtype)
    images = onehot.sum(0)  # support images per class (what decides which rows can be held out)
    counts, sums = images.clone(), onehot.T @ e
    if unlabeled is not None and len(unlabeled):
        usum, ucount = unlabeled_members(embeddings, labels, unlabeled, n)
        counts, sums = counts + ucount, sums + usum
    # every row's distances to the full class means, its own class's without it (a 1-image class's row is left out,
    # unless a candidate joins its class, which rewrites that row's own column)
    raw = _class_distances(e, labels, sums, counts)
    base_dist = raw.clone()
    base_dist[images[labels] < 2] = float("nan")
    base = _log_likelihood(base_dist, labels, temperature)
    logp = torch.log_softmax(-base_dist / temperature, dim=1)
    own = logp.gather(1, labels[:, None]).squeeze(1)
    alt = logp.scatter(1, labels[:, None], float("-inf")).max(1)
    margin = alt.values - own
    scores = torch.zeros(size, dtype=torch.float64)
    scores[torch.isnan(margin)] = float("nan")
    tried = torch.argsort(torch.nan_to_num(margin, nan=float("-inf")), descending=True)[:candidates]
    tried = tried[~torch.isnan(margin[tried])]
    for k in tried.split(RELABEL_CHUNK):  # (K,) candidates, each moved from its class y to its most likely other c
        y, c = labels[k], alt.indices[k]
        moved = labels.expand(len(k), size).clone()
        moved[torch.arange(len(k)), k] = c
        dist = raw.expand(len(k), size, n).clone()
        for cls, total, count in ((y, sums[y] - e[k], counts[y] - 1), (c, sums[c] + e[k], counts[c] + 1)):
            dots = total @ e.T  # (K, S): with |e_i| = 1, |e_i - t / n|^2 = 1 - 2 e_i.t / n + |t|^2 / n^2
            tt = (total * total).sum(1)[:, None]
            col = 1.0 - 2.0 * dots / count[:, None] + tt / count[:, None] ** 2
            m = (count - 1).clamp_min(1)[:, None]  # a member's own mean leaves it out: a^2 - 2 a e_i.t / m + |t|^2 / m^2
            a = count[:, None] / m
            member = moved == cls[:, None]
            col = torch.where(member, a * a - 2.0 * a * dots / m + tt / m**2, col)
            dist.scatter_(2, cls[:, None, None].expand(len(k), size, 1), col[:, :, None])
        class_counts = torch.nn.functional.one_hot(moved, n).sum(1)  # (K, N) after the move
        held = class_counts.gather(1, moved) >= 2  # (K, S): rows whose own class still has 2 or more images
        lp = torch.log_softmax(-dist / temperature, dim=2).gather(2, moved[:, :, None]).squeeze(2)
        scores[k] = torch.where(held, lp, torch.zeros_like(lp)).sum(1) - base
    return scores, alt.indices


def standardized(gains: torch.Tensor) -> torch.Tensor:
    """``(S,)`` relabelling gains -> ``(S,)`` each image's gain in standard deviations above the mean of the task's
    *other* images' gains (a studentised, leave-self-out score: a task where every image fits badly does not flag
    them all, and one image's own gain never hides it). NaN where the gain is NaN or fewer than 3 images have one."""
    g = gains.double()
    finite = ~torch.isnan(g)
    n = int(finite.sum())
    out = torch.full_like(g, float("nan"))
    if n < 3:
        return out
    v = g[finite]
    others_mean = (v.sum() - v) / (n - 1)
    others_var = ((v * v).sum() - v * v) / (n - 1) - others_mean**2
    out[finite] = (v - others_mean) / others_var.clamp_min(0).sqrt().clamp_min(1e-6)
    return out


def mislabel_evidence(
    embeddings: torch.Tensor, labels: torch.Tensor, settings: ReportSettings, unlabeled: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((S,) score, (S,) flagged, (S,) the class it looks like)``: :func:`mislabel_scores` (with the ``(U, d)``
    unlabeled features as soft members where given), standardised where ``settings`` say so; an image is flagged
    when its score is above the settings' threshold and relabelling it does fit the set better (gain > 0)."""
    gains, looks_like = mislabel_scores(embeddings, labels, unlabeled=unlabeled)
    score = standardized(gains) if settings.standardize else gains
    flagged = (score > settings.mislabel_gain) & (gains > 0)
    return score, flagged, looks_like


def pixel_duplicates(pixels: np.ndarray, labels: torch.Tensor) -> list[Flag]:
    """``(S, H, W, C)`` decoded support pixels -> a ``duplicate`` flag for each image equal to an earlier one
    (the same decoded bytes), a ``near_duplicate`` flag for each whose centred cosine with an earlier one, on
    images averaged down to :data:`DUPLICATE_GRID` squared cells, is at least :data:`NEAR_DUPLICATE_COSINE` (a
    re-encoded or slightly edited copy). ``O(S * H * W * C + S^2 * grid^2 * C)``."""
    first: dict[bytes, int] = {}
    exact: dict[int, int] = {}
    for i, image in enumerate(pixels):
        key = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        if key in first:
            exact[i] = first[key]
        else:
            first[key] = i
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).permute(0, 3, 1, 2)
    small = torch.nn.functional.adaptive_avg_pool2d(x, min(DUPLICATE_GRID, x.shape[-1])).flatten(1)
    centred = small - small.mean(1, keepdim=True)
    norms = centred.norm(dim=1)
    unit = centred / norms.clamp_min(1e-9)[:, None]
    cos = (unit @ unit.T).tril(-1)  # cos[i, j] for j < i, 0 elsewhere
    cos[:, norms < 1e-6] = 0.0  # a flat image is like any other flat image only exactly
    best, other = cos.max(1)
    flags = []
    for i in range(1, len(pixels)):
        if i in exact:
            flags.append(Flag(i, "duplicate", 1.0, int(labels[i]), other=exact[i]))
        elif best[i] >= NEAR_DUPLICATE_COSINE:
            flags.append(Flag(i, "near_duplicate", float(best[i]), int(labels[i]), other=int(other[i])))
    return flags


def outlier_scores(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(S, d)`` support features in the model's space -> ``(S,)`` the distance of each image to its class
    mean without it, over the median of those distances in the task (NaN for 1-image classes)."""
    e = embeddings.double()
    n = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, n).double()
    counts = onehot.sum(0)[labels]
    sums = (onehot.T @ e)[labels]
    others = (sums - e) / (counts - 1).clamp_min(1)[:, None]
    dist = (e - others).norm(dim=1)
    dist[counts < 2] = float("nan")
    median = dist.nanmedian()
    return dist / median.clamp_min(1e-12)


@dataclass(frozen=True)
class Unlabeled:
    """The task's view of a request's unlabeled images: ``probabilities (U, N)`` (what Classify would answer) and
    ``embeddings (U, d)`` in the task's space."""

    probabilities: torch.Tensor
    embeddings: torch.Tensor

    @staticmethod
    def of(task: Any, images: torch.Tensor) -> Unlabeled:
        """``(U, C, H, W)`` normalised images through ``task``: one feature pass for both."""
        if hasattr(task, "logits_and_embeddings"):
            logits, embeddings = task.logits_and_embeddings(images)
            return Unlabeled(torch.softmax(logits.float(), dim=1), embeddings)
        embeddings = task.embed(images)
        return Unlabeled(task.embedded_probabilities(embeddings), embeddings)

    @property
    def confidence(self) -> float:
        """The mean highest probability (a fraction)."""
        return float(self.probabilities.float().max(1).values.mean())


def build_report(
    held: HeldOut,
    labels: torch.Tensor,
    pixels: np.ndarray | None = None,
    embeddings: torch.Tensor | None = None,
    settings: ReportSettings | None = None,
    unlabeled: Unlabeled | None = None,
) -> Report:
    """The report of a support set from its held-out predictions, decoded pixels ``(S, ...)`` (duplicates) and
    features ``(S, d)`` in the model's space (mislabels, outliers), with the model's ``settings``; ``unlabeled``:
    the request's unlabeled images as the task sees them (the estimate's confidence term and the mislabel score's
    soft members, with the card's settings for them where it has some)."""
    settings = settings or ReportSettings()
    notes: list[str] = []
    confidence = None
    if unlabeled is not None and len(unlabeled.probabilities):
        confidence = unlabeled.confidence
        if settings.unlabeled is not None:
            settings = settings.unlabeled
        else:
            notes.append("this model's card has no estimate fitted with unlabeled images: they served the flags only")
    else:
        unlabeled = None
    flags: list[Flag] = []
    if pixels is not None:
        flags += pixel_duplicates(pixels, labels)
    if embeddings is not None:
        scores, flagged, looks_like = mislabel_evidence(embeddings, labels, settings, None if unlabeled is None else unlabeled.embeddings)
        for i in torch.nonzero(flagged).flatten().tolist():
            flags.append(Flag(i, "mislabel", float(scores[i]), int(labels[i]), looks_like=int(looks_like[i])))
        ratios = outlier_scores(embeddings, labels)
        mislabelled = {f.index for f in flags if f.kind == "mislabel"}
        for i in torch.nonzero(ratios > OUTLIER_RATIO).flatten().tolist():
            if i not in mislabelled:
                flags.append(Flag(i, "outlier", float(ratios[i]), int(labels[i])))
    flags.sort(key=lambda f: (f.index, f.kind))
    est = estimate(held, labels, settings.mapping, confidence or 0.0)
    count_unlabeled = 0 if unlabeled is None else len(unlabeled.probabilities)
    if est is None:
        shots = int(torch.bincount(labels).max())
        note = (
            "no accuracy estimate: every class has 1 image, and holding one out would remove its class; "
            "send at least 2 images per class for an estimate"
            if shots < 2
            else "no accuracy estimate"
        )
        return Report(None, None, None, held.scheme, 0, held.adaptations, note, [], flags, unlabeled=count_unlabeled, confidence=confidence)
    value, low, high, p_true, loo = est
    count = int(held.held.sum())
    if count != len(labels):
        notes.insert(0, f"{len(labels) - count} images of 1-image classes were not held out")
    note = "; ".join(notes)
    return Report(
        value * 100.0,
        low * 100.0,
        high * 100.0,
        held.scheme,
        count,
        held.adaptations,
        note,
        confusions(held, labels),
        flags,
        p_true,
        loo,
        count_unlabeled,
        confidence,
    )


def adapt_with_report(
    adapter: Any,
    support: torch.Tensor,
    labels: torch.Tensor,
    pixels: np.ndarray | None = None,
    settings: ReportSettings | None = None,
    unlabeled: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor, Report]:
    """``adapter.adapt_reported``, then :func:`build_report`: ``(task, (S, N) support probabilities, report)``
    (what the server's Adapt with ``report`` and ``fewshot report`` both run); ``unlabeled``: ``(U, C, H, W)``
    normalised unlabeled images (one more feature pass over them)."""
    task, probabilities, held, embeddings = adapter.adapt_reported(support, labels)
    seen = Unlabeled.of(task, unlabeled) if unlabeled is not None and len(unlabeled) else None
    return task, probabilities, build_report(held, labels, pixels, embeddings, settings, seen)
