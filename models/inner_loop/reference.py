"""The inner loop written the obvious way, as the reference the engine (:mod:`fewshot.models.inner_loop.engine`)
is checked and timed against: a functional Conv-4 with its linear head, ``torch.autograd.grad`` on the
support loss, ``theta -= alpha g`` (MAML, Finn et al. 2017, https://arxiv.org/abs/1703.03400, eq. 1),
the same steps and BatchNorm semantics (batch statistics while adapting and the support set's statistics
frozen after it; or, for a network initialised from a metric backbone, the backbone's statistics in units
of each weight's norm). It covers MAML and CxGrad (Lee et al., Algorithms 1-2: implicit gradient scaling
``W_l <- gamma_l W_l / ||W_l||`` with ``gamma = g_phi(nu)``, eq. 6-8, and ``nu -= beta g_nu``), whichever
blocks the network adapts and however its head starts. Every call runs the whole network on the images,
as a loop written from the papers would: the engine's own economies (a fixed stem run once, channels-last,
the stem in ONNX Runtime) are what ``fewshot bench --compare`` measures against it. ``reference_adapt(...,
stem_once=True)`` is the stricter reference: the same loop fed the stem's output computed once.
``tests/test_inner_loop.py`` checks that it and the engine reach the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Arch:
    """What the reference needs to know of a :class:`~fewshot.models.inner_loop.network.MetaConv4`:
    ``pools`` (blocks ending in a max-pool), ``frozen_bn`` (statistics in units of the weight norm),
    ``transform`` (``""``, ``L2N``, ``CL2N``), ``adapt_from`` (first adapted block), ``eps``."""

    pools: int = 4
    frozen_bn: bool = False
    transform: str = ""
    adapt_from: int = 0
    eps: float = 1e-8

    @staticmethod
    def of(net) -> Arch:
        return Arch(net.pools, net.frozen_bn, net.transform, net.adapt_from, net.bn_eps)


def _block(p: dict[str, torch.Tensor], h: torch.Tensor, l: int, arch: Arch, stats: list | None, record: list | None) -> torch.Tensor:
    """Conv -> BatchNorm -> ReLU -> 2x2 max-pool (the first ``arch.pools`` blocks)."""
    w = p[f"conv{l}.weight"]
    h = F.conv2d(h, w, padding=1)
    gamma, beta = p[f"bn{l}.weight"], p[f"bn{l}.bias"]
    if arch.frozen_bn:
        norm = w.norm()
        mean, var = p[f"bn{l}.mean"] * norm, p[f"bn{l}.var"] * norm * norm
        h = (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + arch.eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    elif stats is None:
        if record is not None:
            record.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)))
        h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=arch.eps)
    else:
        h = F.batch_norm(h, stats[l][0], stats[l][1], gamma, beta, training=False, eps=arch.eps)
    h = F.relu(h)
    return F.max_pool2d(h, 2) if l < arch.pools else h


def reference_stem(p: dict[str, torch.Tensor], x: torch.Tensor, arch: Arch) -> torch.Tensor:
    """The blocks before ``arch.adapt_from`` (a fixed stem, frozen statistics) on images ``x``."""
    with torch.no_grad():
        for l in range(arch.adapt_from):
            x = _block(p, x, l, arch, None, None)
    return x


def reference_embed(
    p: dict[str, torch.Tensor], x: torch.Tensor, stats: list | None, arch: Arch, record: list | None = None, first: int = 0
) -> torch.Tensor:
    """Blocks ``first..3`` on ``x``, flattened, through the feature transform: ``(B, d)``."""
    h = x
    for l in range(first, 4):
        h = _block(p, h, l, arch, stats, record)
    f = h.flatten(1)
    if arch.transform == "CL2N":
        f = f - p["center"]
    return f / f.norm(dim=1, keepdim=True) if arch.transform else f


def reference_forward(
    p: dict[str, torch.Tensor], x: torch.Tensor, stats: list | None, eps: float | Arch, record: list | None = None, first: int = 0
) -> torch.Tensor:
    """Conv-4 + linear head written plainly: ``(B, C, H, W)`` images (or, ``first`` > 0, the output of block
    ``first - 1``) -> ``(B, N)`` logits. ``stats`` None: batch statistics (appended to ``record`` when given);
    else the frozen (mean, var) per layer. ``eps``: the BatchNorm epsilon of a plain Conv-4, or its :class:`Arch`."""
    arch = eps if isinstance(eps, Arch) else Arch(eps=eps)
    return F.linear(reference_embed(p, x, stats, arch, record, first), p["head.weight"], p["head.bias"])


def _start_head(p: dict[str, torch.Tensor], support: torch.Tensor, labels: torch.Tensor, arch: Arch, head_init: str, first: int) -> None:
    """The head a task starts from, in place: ``learned`` (as stored), ``shared`` (the mean row for every class)
    or ``centroid`` (``W_c = 2 tau m_c``, ``b_c = -tau ||m_c||^2`` on the transformed support features)."""
    n = int(labels.max()) + 1
    if head_init == "shared":
        p["head.weight"] = p["head.weight"].mean(0, keepdim=True).expand(n, -1).clone()
        p["head.bias"] = p["head.bias"].mean().expand(n).clone()
    elif head_init == "centroid":
        with torch.no_grad():
            z = reference_embed(p, support, None, arch, first=first)
            means = torch.stack([z[labels == c].mean(0) for c in range(n)])
            tau = p["head.log_scale"].exp()
            p["head.weight"], p["head.bias"] = 2.0 * tau * means, -tau * (means * means).sum(1)
    elif head_init != "learned":
        raise ValueError(f"the reference loop has no head initialisation {head_init!r}")


def reference_adapt(
    params: dict[str, torch.Tensor],
    support: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    alpha: float,
    arch: Arch,
    head_alpha: float | None = None,
    head_init: str = "learned",
    g_phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
    beta: float = 1.0,
    stem_once: bool = False,
) -> tuple[dict[str, torch.Tensor], list | None]:
    """``steps`` of ``theta -= alpha * grad`` on the support loss for the convolutions from block
    ``arch.adapt_from`` on and the head (step ``head_alpha``, default ``alpha``); BatchNorm affine parameters
    are meta-learned only. With ``g_phi`` (CxGrad): a context ``nu`` (zeros, one step ``nu -= beta g_nu``
    before the loop), and at every step the adapted convs rescaled to norms ``g_phi(nu)`` before the
    gradient, ``nu`` updated with them. Returns the adapted parameters and the support set's BatchNorm
    statistics under them (``None`` for frozen statistics, which follow the weights). ``stem_once``: the
    blocks before ``adapt_from`` run once, not at every step."""
    convs = [f"conv{l}.weight" for l in range(arch.adapt_from, 4)]
    adapted = convs + ["head.weight", "head.bias"]
    first = arch.adapt_from if stem_once else 0
    x = reference_stem(params, support, arch) if stem_once else support
    p = {k: v.detach().clone() for k, v in params.items()}
    _start_head(p, x, labels, arch, head_init, first)
    p = {k: v.requires_grad_(k in adapted) for k, v in p.items()}

    def scaled(q: dict[str, torch.Tensor], nu: torch.Tensor) -> dict[str, torch.Tensor]:
        assert g_phi is not None
        gamma = g_phi(nu)
        return q | {k: gamma[i] * q[k] / q[k].norm() for i, k in enumerate(convs)}

    nu = None
    if g_phi is not None:
        nu = torch.zeros(next(iter(g_phi.parameters())).shape[1], requires_grad=True)  # type: ignore[attr-defined]
        (g_nu,) = torch.autograd.grad(F.cross_entropy(reference_forward(scaled(p, nu), x, None, arch, first=first), labels), [nu])
        nu = (nu - beta * g_nu).detach().requires_grad_(True)
    for _ in range(steps):
        q = scaled(p, nu) if nu is not None else p
        loss = F.cross_entropy(reference_forward(q, x, None, arch, first=first), labels)
        grads = torch.autograd.grad(loss, [q[k] for k in adapted] + ([nu] if nu is not None else []))
        steps_of = {k: (head_alpha or alpha) if k.startswith("head.") else alpha for k in adapted}
        p = p | {k: (q[k] - steps_of[k] * g).detach().requires_grad_(True) for k, g in zip(adapted, grads)}
        if nu is not None:
            nu = (nu - beta * grads[-1]).detach().requires_grad_(True)
    stats: list | None = None
    if not arch.frozen_bn:
        stats = []
        with torch.no_grad():
            reference_forward(p, x, None, arch, record=stats, first=first)
    return {k: v.detach() for k, v in p.items()}, stats


def reference_maml(
    params: dict[str, torch.Tensor], support: torch.Tensor, labels: torch.Tensor, steps: int, alpha: float, eps: float
) -> tuple[dict[str, torch.Tensor], list]:
    """MAML on a plain Conv-4 (four pools, batch statistics, every block adapted, the learned head)."""
    params_out, stats = reference_adapt(params, support, labels, steps, alpha, Arch(eps=eps))
    assert stats is not None
    return params_out, stats
