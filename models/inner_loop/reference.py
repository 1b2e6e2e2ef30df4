"""The inner loop written the obvious way, as the reference the engine (:mod:`fewshot.models.inner_loop.engine`)
is checked and timed against: a functional Conv-4 with its linear head, ``torch.autograd.grad`` on the
support loss, ``theta -= alpha g`` (MAML, Finn et al. 2017, https://arxiv.org/abs/1703.03400, eq. 1),
the same steps and BatchNorm semantics (batch statistics while adapting, the support set's statistics
frozen after it). It covers the rules whose update is plain gradient descent on every adapted parameter
(MAML); ``fewshot bench --compare`` times it against the engine and ``tests/test_inner_loop.py`` checks
that both reach the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_forward(
    p: dict[str, torch.Tensor], x: torch.Tensor, stats: list | None, eps: float, record: list | None = None
) -> torch.Tensor:
    """Conv-4 + linear head written plainly: conv (no bias) -> BatchNorm -> ReLU -> 2x2 max-pool, x4.
    ``stats`` None: batch statistics (appended to ``record`` when given); else the frozen (mean, var)
    per layer."""
    h = x
    for l in range(4):
        h = F.conv2d(h, p[f"conv{l}.weight"], padding=1)
        if stats is None:
            if record is not None:
                record.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)))
            h = F.batch_norm(h, None, None, p[f"bn{l}.weight"], p[f"bn{l}.bias"], training=True, eps=eps)
        else:
            h = F.batch_norm(h, stats[l][0], stats[l][1], p[f"bn{l}.weight"], p[f"bn{l}.bias"], training=False, eps=eps)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), p["head.weight"], p["head.bias"])


def reference_maml(
    params: dict[str, torch.Tensor], support: torch.Tensor, labels: torch.Tensor, steps: int, alpha: float, eps: float
) -> tuple[dict[str, torch.Tensor], list]:
    """``steps`` of ``theta -= alpha * grad`` on the support loss (batch BatchNorm) for the convolutions
    and the head (MAML adapts those; the BatchNorm affine parameters are meta-learned only), then the
    support set's BatchNorm statistics under the adapted weights."""
    adapted = [f"conv{l}.weight" for l in range(4)] + ["head.weight", "head.bias"]
    p = {k: v.detach().clone().requires_grad_(k in adapted) for k, v in params.items()}
    for _ in range(steps):
        loss = F.cross_entropy(reference_forward(p, support, None, eps), labels)
        grads = torch.autograd.grad(loss, [p[k] for k in adapted])
        p |= {k: (p[k] - alpha * g).detach().requires_grad_(True) for k, g in zip(adapted, grads)}
    stats: list = []
    with torch.no_grad():
        reference_forward(p, support, None, eps, record=stats)
    return {k: v.detach() for k, v in p.items()}, stats
