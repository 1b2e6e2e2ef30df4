"""The gradient-adapted classifier: Conv-4 + linear head as a pure function of its parameters.

``forward(params, x, bn_stats=None)`` uses only ``torch.nn.functional`` ops on tensors passed in, so
the same code runs in the inner loop (parameters are adapted tensors with autograd history), in
evaluation, in the server, and exports to ONNX with the weights as graph inputs.

BatchNorm has two modes (see the gradient-adaptation issue):

* ``transductive`` (the CxGrad/MAML protocol): every call normalises with its own batch statistics,
  so a query's prediction depends on the other queries of its batch;
* ``support``: at the end of adaptation the statistics of the support set under the adapted weights
  are computed once (:func:`support_statistics`) and frozen; queries are normalised with them, so
  each query is classified independently (what a batching server needs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

BNMode = Literal["transductive", "support"]
BN_MODES: tuple[str, ...] = ("transductive", "support")
#: BatchNorm epsilon. Small, so that implicit gradient scaling (CxGrad eq. 4) leaves the output
#: unchanged: BN(a z) with epsilon e equals BN(z) with epsilon e / a^2, and rescaling Conv-4 weights
#: from norm ~8 to gamma ~0.7 (a ~ 0.09) turned torch's default 1e-5 into 1e-3 and moved logits by 6e-3.
BN_EPS = 1e-8
Params = dict[str, torch.Tensor]
#: Per BatchNorm layer: (mean, var) of its input channels.
BNStats = list[tuple[torch.Tensor, torch.Tensor]]


class MetaConv4:
    """Conv-4 (3x3 conv without bias -> BatchNorm -> ReLU -> 2x2 max-pool, four blocks) + linear head.
    The pool runs before the ReLU: the same values and gradients (ReLU is monotone), a quarter of the
    ReLU work.

    Parameter names: ``conv{l}.weight``, ``bn{l}.weight``, ``bn{l}.bias`` for ``l`` in 0..3,
    ``head.weight`` ``(ways, d)`` and ``head.bias``. ``per_step_bn`` (MAML++) keeps one set of
    BatchNorm affine parameters per inner step: ``bn{l}.weight.{t}``.
    """

    def __init__(self, in_channels: int, width: int, image_size: int, ways: int, per_step_bn: int = 0,
                 bn_eps: float = BN_EPS) -> None:
        self.in_channels, self.width, self.image_size, self.ways = in_channels, width, image_size, ways
        self.per_step_bn, self.bn_eps = per_step_bn, bn_eps
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_dim = width * side * side
        self.conv_names = [f"conv{l}.weight" for l in range(4)]
        self.head_names = ["head.weight", "head.bias"]

    @property
    def config(self) -> dict:
        return {"arch": "conv4", "in_channels": self.in_channels, "width": self.width, "image_size": self.image_size,
                "ways": self.ways, "per_step_bn": self.per_step_bn, "bn_eps": self.bn_eps}

    def init_params(self, generator: torch.Generator | None = None) -> Params:
        """Kaiming-uniform convs (as ``nn.Conv2d``), unit BatchNorm, zero head (MAML++ practice)."""
        params: Params = {}
        cin = self.in_channels
        for l in range(4):
            w = torch.empty(self.width, cin, 3, 3)
            bound = 1.0 / math.sqrt(cin * 9) * math.sqrt(3.0)
            params[f"conv{l}.weight"] = w.uniform_(-bound, bound, generator=generator)
            copies = max(1, self.per_step_bn)
            for t in range(copies):
                suffix = f".{t}" if self.per_step_bn else ""
                params[f"bn{l}.weight{suffix}"] = torch.ones(self.width)
                params[f"bn{l}.bias{suffix}"] = torch.zeros(self.width)
            cin = self.width
        params["head.weight"] = torch.zeros(self.ways, self.feature_dim)
        params["head.bias"] = torch.zeros(self.ways)
        return params

    def bn_names(self, step: int | None = None) -> list[str]:
        suffix = f".{min(step or 0, self.per_step_bn - 1)}" if self.per_step_bn else ""
        return [n for l in range(4) for n in (f"bn{l}.weight{suffix}", f"bn{l}.bias{suffix}")]

    def forward(self, params: Params, x: torch.Tensor, bn_stats: BNStats | None = None, step: int | None = None,
                record: BNStats | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, N)``: :meth:`features`, then the linear head (``N`` is the head's
        number of rows: ``ways``, or a task's own number of classes with a prototype head)."""
        return F.linear(self.features(params, x, bn_stats, step, record), params["head.weight"], params["head.bias"])

    def features(self, params: Params, x: torch.Tensor, bn_stats: BNStats | None = None, step: int | None = None,
                 record: BNStats | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, feature_dim)``, the body's flattened output.

        Args:
            bn_stats: frozen per-layer (mean, var) (``support`` mode); ``None`` normalises with the
                batch's own statistics.
            step: inner step, selects the per-step BatchNorm parameters (MAML++).
            record: if a list is given, the batch statistics used by each layer are appended to it.
        """
        suffix = f".{min(step or 0, self.per_step_bn - 1)}" if self.per_step_bn else ""
        h = x
        for l in range(4):
            h = F.conv2d(h, params[f"conv{l}.weight"], padding=1)
            gamma, beta = params[f"bn{l}.weight{suffix}"], params[f"bn{l}.bias{suffix}"]
            if bn_stats is None:
                if record is not None:
                    record.append((h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)))
                h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=self.bn_eps)
            else:
                mean, var = bn_stats[l]
                if mean.requires_grad or var.requires_grad:  # meta-training in support mode: keep the graph
                    # The same normalisation folded into one per-channel affine map, so the big activation
                    # tensor sees one multiply and one add (and their two backward ops) instead of
                    # sub/div/mul/add (equal to float rounding; the speed-up is measured in RESULTS.md).
                    scale = gamma * torch.rsqrt(var + self.bn_eps)
                    shift = beta - mean * scale
                    h = h * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
                else:
                    h = F.batch_norm(h, mean, var, gamma, beta, training=False, eps=self.bn_eps)
            h = F.relu(F.max_pool2d(h, 2))  # = max_pool(relu(h)) (relu is monotone), on a quarter of the values
        return h.flatten(1)

    def task_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The support loss (cross-entropy, mean over the batch): a 0-dim tensor."""
        return F.cross_entropy(logits, labels)


def support_statistics(net: MetaConv4, params: Params, support: torch.Tensor, step: int | None = None,
                       differentiable: bool = False) -> BNStats:
    """Per-layer BatchNorm (mean, biased var) of the support set under ``params``; with
    ``differentiable`` the statistics keep their graph (meta-training in ``support`` mode)."""
    stats: BNStats = []
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        net.forward(params, support, None, step, record=stats)
    return stats if differentiable else [(m.detach(), v.detach()) for m, v in stats]
