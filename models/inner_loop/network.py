"""The inner-loop classifier: Conv-4 + linear head as a pure function of its parameters.

``forward(params, x, bn_stats=None)`` uses only ``torch.nn.functional`` ops on tensors passed in, so
the same code runs in the inner loop (parameters are adapted tensors with autograd history), in
evaluation, in the server, and exports to ONNX with the weights as graph inputs.

BatchNorm has two modes (see the gradient-adaptation issue):

* ``transductive`` (the CxGrad/MAML protocol): every call normalises with its own batch statistics,
  so a query's prediction depends on the other queries of its batch;
* ``support``: at the end of adaptation the statistics of the support set under the adapted weights
  are computed once (:func:`support_statistics`) and frozen; queries are normalised with them, so
  each query is classified independently (what a batching server needs).

A network initialised from a pretrained metric backbone (``frozen_bn``, issue 33) never reads a batch's
statistics: its BatchNorm uses the backbone's running statistics, stored *in units of each conv weight's
norm* (``bn{l}.mean`` ``= mu / ||W_l||``, ``bn{l}.var`` ``= sigma^2 / ||W_l||^2``) and rescaled by the
current norm at every call. At the backbone's weights that is exactly its eval-mode BatchNorm, and the
layer stays invariant to the scale of ``W_l``, the property CxGrad's implicit gradient scaling rests on
(CxGrad eq. 4, which the paper gets from batch statistics). Its features can then go through the metric
path's transform (``transform="CL2N"``: ``(f - c) / ||f - c||`` with the backbone's centering vector
``center``) before the linear head, so the head can start as the nearest-centroid classifier
(:func:`~fewshot.models.inner_loop.engine.centroid_head`). ``adapt_from`` blocks are the stem: neither
adapted nor meta-trained, computed once per image (:meth:`MetaConv4.stem`, :meth:`MetaConv4.tail`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError

BNMode = Literal["transductive", "support"]
BN_MODES: tuple[str, ...] = ("transductive", "support")
#: BatchNorm epsilon. Small, so that implicit gradient scaling (CxGrad eq. 4) leaves the output
#: unchanged: BN(a z) with epsilon e equals BN(z) with epsilon e / a^2, and rescaling Conv-4 weights
#: from norm ~8 to gamma ~0.7 (a ~ 0.09) turned torch's default 1e-5 into 1e-3 and moved logits by 6e-3.
BN_EPS = 1e-8
Params = dict[str, torch.Tensor]
#: Feature transforms a network can apply before its head (``""``: none; SimpleShot's L2N / CL2N).
FEATURE_TRANSFORMS: tuple[str, ...] = ("", "L2N", "CL2N")
#: Per BatchNorm layer: (mean, var) of its input channels.
BNStats = list[tuple[torch.Tensor, torch.Tensor]]


#: Largest im2col matrix (bytes) :class:`StemColumns` builds; a larger support set convolves as usual.
COLUMNS_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class StemColumns:
    """The stem output ``(B, c, h, w)`` unfolded once into the 3x3 patches of the first adapted convolution:
    ``cols`` ``(B*h*w, c*9)``. That convolution's input is fixed during the inner loop, so at every step it
    is one matrix product ``cols @ W^T`` and its weight gradient one more (``cols^T @ dY``), instead of a
    convolution forward and backward each (what the inner loop spends most in: BENCHMARKS.md)."""

    cols: torch.Tensor
    batch: int
    height: int
    width: int

    @staticmethod
    def of(h: torch.Tensor) -> StemColumns | torch.Tensor:
        """``h`` unfolded, or ``h`` itself where the matrix would exceed :data:`COLUMNS_MAX_BYTES`."""
        b, c, hh, ww = h.shape
        if b * hh * ww * c * 9 * h.element_size() > COLUMNS_MAX_BYTES:
            return h
        cols = F.unfold(h, 3, padding=1).transpose(1, 2).reshape(b * hh * ww, c * 9)
        return StemColumns(cols.contiguous(), b, hh, ww)

    def __len__(self) -> int:
        return self.batch

    def conv(self, weight: torch.Tensor) -> torch.Tensor:
        """The 3x3, padding-1 convolution with ``weight`` ``(o, c, 3, 3)``: ``(B, o, h, w)`` (channels-last strides)."""
        out = self.cols.to(weight.dtype) @ weight.flatten(1).T
        return out.view(self.batch, self.height, self.width, -1).permute(0, 3, 1, 2)


class MetaConv4:
    """Conv-4 (3x3 conv without bias -> BatchNorm -> ReLU -> 2x2 max-pool, four blocks) + linear head.
    The pool runs before the ReLU: the same values and gradients (ReLU is monotone), a quarter of the
    ReLU work.

    Parameter names: ``conv{l}.weight``, ``bn{l}.weight``, ``bn{l}.bias`` for ``l`` in 0..3,
    ``head.weight`` ``(ways, d)`` and ``head.bias``. ``per_step_bn`` (MAML++) keeps one set of
    BatchNorm affine parameters per inner step: ``bn{l}.weight.{t}``.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        image_size: int,
        ways: int,
        per_step_bn: int = 0,
        bn_eps: float = BN_EPS,
        pools: int = 4,
        frozen_bn: bool = False,
        transform: str = "",
        adapt_from: int = 0,
    ) -> None:
        """``pools``: how many of the four blocks end with a max-pool (the first ``pools``; Omniglot's
        direct-sum backbone has 2). ``frozen_bn``, ``transform`` (``""``, ``L2N`` or ``CL2N``) and
        ``adapt_from`` (the first block the inner loop adapts; earlier blocks are a fixed stem): see the
        module docstring."""
        if transform not in FEATURE_TRANSFORMS:
            raise ConfigError(f"unknown feature transform {transform!r}: use one of {FEATURE_TRANSFORMS}")
        if not 0 <= adapt_from <= 3:
            raise ConfigError(f"adapt_from must be in 0..3 (the first adapted block), got {adapt_from}")
        if adapt_from and not frozen_bn:
            raise ConfigError("a fixed stem (adapt_from > 0) needs frozen BatchNorm statistics (a pretrained backbone)")
        if not 0 <= pools <= 4:
            raise ConfigError(f"pools must be in 0..4, got {pools}")
        self.in_channels, self.width, self.image_size, self.ways = in_channels, width, image_size, ways
        self.per_step_bn, self.bn_eps, self.pools = per_step_bn, bn_eps, pools
        self.frozen_bn, self.transform, self.adapt_from = frozen_bn, transform, adapt_from
        side = image_size
        for _ in range(pools):
            side //= 2
        self.feature_dim = width * side * side
        #: The conv weights the inner loop adapts (CxGrad scales these: one factor each).
        self.conv_names = [f"conv{l}.weight" for l in range(adapt_from, 4)]
        self.head_names = ["head.weight", "head.bias"]

    @property
    def config(self) -> dict:
        """Constructor arguments (what a card's ``architecture`` holds; options at their defaults left out,
        so older cards read the same)."""
        extra = {"pools": self.pools, "frozen_bn": self.frozen_bn, "transform": self.transform, "adapt_from": self.adapt_from}
        defaults = {"pools": 4, "frozen_bn": False, "transform": "", "adapt_from": 0}
        return {
            "arch": "conv4",
            "in_channels": self.in_channels,
            "width": self.width,
            "image_size": self.image_size,
            "ways": self.ways,
            "per_step_bn": self.per_step_bn,
            "bn_eps": self.bn_eps,
            **{k: v for k, v in extra.items() if v != defaults[k]},
        }

    def frozen_names(self) -> list[str]:
        """Parameters outside meta-training: the stem's blocks and the frozen statistics."""
        stem = [n for l in range(self.adapt_from) for n in (f"conv{l}.weight", f"bn{l}.weight", f"bn{l}.bias")]
        stats = [n for l in range(4) for n in (f"bn{l}.mean", f"bn{l}.var")] if self.frozen_bn else []
        return stem + stats + (["center"] if self.transform == "CL2N" else [])

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
            if self.frozen_bn:  # placeholders: a pretrained backbone's statistics replace them
                params[f"bn{l}.mean"], params[f"bn{l}.var"] = torch.zeros(self.width), torch.ones(self.width)
            cin = self.width
        params["head.weight"] = torch.zeros(self.ways, self.feature_dim)
        params["head.bias"] = torch.zeros(self.ways)
        if self.transform:
            # the log temperature of the centroid head (inner_loop.centroid_head): meta-learned
            params["head.log_scale"] = torch.tensor(math.log(10.0))
        if self.transform == "CL2N":
            params["center"] = torch.zeros(self.feature_dim)
        return params

    def frozen_statistics(self, params: Params) -> BNStats:
        """Per layer (mean, var) of a ``frozen_bn`` network under ``params``: the stored statistics times
        the conv weight's norm (its square for the variance); differentiable in the weights."""
        out = []
        for l in range(4):
            norm = params[f"conv{l}.weight"].flatten(-4).norm(dim=-1)  # () or (T,) for stacked weights
            norm = norm.unsqueeze(-1)
            out.append((params[f"bn{l}.mean"] * norm, params[f"bn{l}.var"] * norm * norm))
        return out

    def stem(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the input of block ``adapt_from`` (no graph: the stem is fixed)."""
        with torch.no_grad():
            return self._blocks(params, x, self.frozen_statistics(params) if self.frozen_bn else None, None, None, 0, self.adapt_from)

    def tail(self) -> NetworkTail:
        """This network from block ``adapt_from`` on, fed :meth:`stem` outputs (the inner loop's view)."""
        return NetworkTail(self)

    def embed(
        self,
        params: Params,
        x: torch.Tensor | StemColumns,
        bn_stats: BNStats | None = None,
        step: int | None = None,
        record: BNStats | None = None,
        first: int = 0,
    ) -> torch.Tensor:
        """:meth:`features` through the feature transform: what the head reads ``(B, feature_dim)``."""
        f = self.features(params, x, bn_stats, step, record, first)
        if self.transform == "CL2N":
            f = f - params["center"].to(f.dtype)
        return F.normalize(f, dim=-1) if self.transform else f

    def bn_names(self, step: int | None = None) -> list[str]:
        suffix = f".{min(step or 0, self.per_step_bn - 1)}" if self.per_step_bn else ""
        return [n for l in range(4) for n in (f"bn{l}.weight{suffix}", f"bn{l}.bias{suffix}")]

    def forward(
        self,
        params: Params,
        x: torch.Tensor | StemColumns,
        bn_stats: BNStats | None = None,
        step: int | None = None,
        record: BNStats | None = None,
        first: int = 0,
    ) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, N)``: :meth:`embed`, then the linear head (``N`` is the head's
        number of rows: ``ways``, or a task's own number of classes with a prototype head)."""
        return F.linear(self.embed(params, x, bn_stats, step, record, first), params["head.weight"], params["head.bias"])

    def features(
        self,
        params: Params,
        x: torch.Tensor | StemColumns,
        bn_stats: BNStats | None = None,
        step: int | None = None,
        record: BNStats | None = None,
        first: int = 0,
    ) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, feature_dim)``, the body's flattened output.

        Args:
            bn_stats: frozen per-layer (mean, var) (``support`` mode); ``None`` normalises with the
                batch's own statistics.
            step: inner step, selects the per-step BatchNorm parameters (MAML++).
            record: if a list is given, the batch statistics used by each layer are appended to it.
            first: the block ``x`` enters (``adapt_from`` for a :meth:`stem` output).

        A ``frozen_bn`` network without ``bn_stats`` uses :meth:`frozen_statistics` (never the batch's).
        """
        if bn_stats is None and self.frozen_bn:
            bn_stats = self.frozen_statistics(params)
        return self._blocks(params, x, bn_stats, step, record, first, 4).flatten(1)

    def _blocks(
        self,
        params: Params,
        x: torch.Tensor | StemColumns,
        bn_stats: BNStats | None,
        step: int | None,
        record: BNStats | None,
        first: int,
        last: int,
    ) -> torch.Tensor:
        """Blocks ``first..last-1`` on ``x``."""
        suffix = f".{min(step or 0, self.per_step_bn - 1)}" if self.per_step_bn else ""
        h = x
        for l in range(first, last):
            w = params[f"conv{l}.weight"]
            h = h.conv(w) if isinstance(h, StemColumns) else F.conv2d(h, w, padding=1)
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
            # = max_pool(relu(h)) (relu is monotone), on a quarter of the values
            h = F.relu(F.max_pool2d(h, 2)) if l < self.pools else F.relu(h)
        assert isinstance(h, torch.Tensor), "no block ran on the stem's columns"
        return h

    def task_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The support loss (cross-entropy, mean over the batch): a 0-dim tensor."""
        return F.cross_entropy(logits, labels)


class NetworkTail:
    """A :class:`MetaConv4` from block ``adapt_from`` on: ``forward``/``features``/``embed`` take the
    :meth:`MetaConv4.stem` output (what the inner loop and meta-training run when the stem is fixed)."""

    def __init__(self, net: MetaConv4) -> None:
        self.net = net

    def __getattr__(self, name: str):
        return getattr(self.net, name)

    def forward(
        self,
        params: Params,
        h: torch.Tensor | StemColumns,
        bn_stats: BNStats | None = None,
        step: int | None = None,
        record: BNStats | None = None,
    ) -> torch.Tensor:
        return self.net.forward(params, h, bn_stats, step, record, first=self.net.adapt_from)

    def features(
        self,
        params: Params,
        h: torch.Tensor | StemColumns,
        bn_stats: BNStats | None = None,
        step: int | None = None,
        record: BNStats | None = None,
    ) -> torch.Tensor:
        return self.net.features(params, h, bn_stats, step, record, first=self.net.adapt_from)

    def embed(
        self,
        params: Params,
        h: torch.Tensor | StemColumns,
        bn_stats: BNStats | None = None,
        step: int | None = None,
        record: BNStats | None = None,
    ) -> torch.Tensor:
        return self.net.embed(params, h, bn_stats, step, record, first=self.net.adapt_from)


def support_statistics(
    net: MetaConv4 | NetworkTail, params: Params, support: torch.Tensor, step: int | None = None, differentiable: bool = False
) -> BNStats:
    """Per-layer BatchNorm (mean, biased var) of the support set under ``params``; with
    ``differentiable`` the statistics keep their graph (meta-training in ``support`` mode). A
    ``frozen_bn`` network's statistics do not depend on the support set: :meth:`MetaConv4.frozen_statistics`."""
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        if net.frozen_bn:
            stats = net.frozen_statistics(params)
        else:
            stats = []
            net.forward(params, support, None, step, record=stats)
    return stats if differentiable else [(m.detach(), v.detach()) for m, v in stats]
