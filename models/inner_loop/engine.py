"""One functional inner-loop engine for every gradient-based method.

``inner_loop(net, rule, params, support, labels, steps, create_graph)`` adapts the meta-parameters
to one task and returns the adapted parameters (and, for the multi-step loss, those of every step).
Meta-training, ``fewshot eval`` and the server all call it; :class:`InnerLoopAdapter` wraps it in the
adapter interface (``adapt(support) -> task state``, ``state.classify(query)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fewshot.errors import ConfigError
from fewshot.models.inner_loop.network import BN_MODES, BNStats, MetaConv4, NetworkTail, Params, StemColumns, support_statistics
from fewshot.models.inner_loop.rules import Context, UpdateRule
from fewshot.models.interrupt import checkpoint


@dataclass
class Adaptation:
    """Result of one inner loop: final parameters, the per-step parameters (after each step), the
    support loss before each step (a float; for stacked tasks a list, one per task) and the rule's
    final context."""

    params: Params
    per_step: list[Params]
    losses: list[float]
    ctx: Context = field(default_factory=dict)


#: How an inner loop starts its head: ``learned`` (the meta-learned ``(ways, d)`` head: tasks of exactly
#: the training ways), ``prototypes`` (Proto-MAML, Triantafillou et al., ICLR 2020: ``W_c = 2 m_c``,
#: ``b_c = -||m_c||^2`` from the class means ``m_c`` of the body's support features: any number of classes)
#: or ``shared`` (Ye and Chao, ICLR 2022, "How to train your MAML to excel in few-shot classification":
#: one meta-learned row, the mean of the stored head's rows, replicated for every class, so every task
#: starts at the uniform prediction and the inner loop does the separating; any number of classes).
#: With ``prototypes`` a 1-shot support set sits on its own prototypes: its loss starts near 0 and the
#: inner loop has almost nothing to do (RESULTS.md); ``shared`` keeps it at work. ``centroid`` (issue 33):
#: the metric path's nearest-centroid classifier on the network's transformed features, with the
#: meta-learned temperature ``exp(head.log_scale)`` (:func:`centroid_head`): zero steps answer as the centroid.
HEAD_INITS = ("learned", "prototypes", "shared", "centroid")


def shared_head(params: Params, labels: torch.Tensor) -> Params:
    """``params`` with the head replaced by its mean row and bias repeated for the ``N`` classes of
    ``labels`` (differentiable: the meta-gradient of the one row is the sum over classes)."""
    n = int(labels.max()) + 1
    w, b = params["head.weight"], params["head.bias"]
    return {**params, "head.weight": w.mean(0, keepdim=True).expand(n, -1), "head.bias": b.mean().expand(n)}


def prototype_head(net: MetaConv4 | NetworkTail, params: Params, support: torch.Tensor | StemColumns, labels: torch.Tensor) -> Params:
    """``params`` with the head replaced by the prototype head of the support set ``(S, C, H, W)``,
    ``(S,)`` labels in ``0..N-1``: ``(N, d)`` weights ``2 m_c`` and ``(N,)`` biases ``-||m_c||^2``, so the
    logits are ``-||h - m_c||^2`` up to a per-query constant. Features under the support set's own
    BatchNorm statistics, as the loop's first step sees them; differentiable (meta-training backpropagates
    through the prototypes, as Proto-MAML does)."""
    h = net.features(params, support).to(params["head.weight"].dtype)  # float32 under bfloat16 autocast too
    onehot = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).to(h.dtype)
    means = (onehot.T @ h) / onehot.sum(0)[:, None]
    return {**params, "head.weight": 2.0 * means, "head.bias": -(means * means).sum(1)}


def centroid_head(net: MetaConv4 | NetworkTail, params: Params, support: torch.Tensor | StemColumns, labels: torch.Tensor) -> Params:
    """``params`` with the head replaced by the nearest-centroid classifier on the transformed features
    ``z`` (``net.transform``, e.g. CL2N) of the support set ``(S, ...)``: prototypes ``p_c`` (class means of
    ``z``, as the metric path's centroid head), weights ``2 tau p_c`` and biases ``-tau ||p_c||^2`` with
    ``tau = exp(head.log_scale)``, so the logits are ``-tau ||z - p_c||^2`` up to a per-query constant:
    the centroid's ranking, at the learned temperature. Differentiable in the body and ``tau``."""
    if not net.transform:
        raise ConfigError(
            "the centroid head starts from transformed features: a network with a feature transform "
            "(initialised from a metric backbone, --init-backbone)"
        )
    z = net.embed(params, support).to(params["head.weight"].dtype)
    onehot = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).to(z.dtype)
    means = (onehot.T @ z) / onehot.sum(0)[:, None]
    tau = params["head.log_scale"].exp()
    return {**params, "head.weight": 2.0 * tau * means, "head.bias": -tau * (means * means).sum(1)}


def inner_loop(
    net: MetaConv4 | NetworkTail,
    rule: UpdateRule,
    params: Params,
    support: torch.Tensor | StemColumns,
    labels: torch.Tensor,
    steps: int,
    create_graph: bool = False,
    head_init: str = "learned",
    record_losses: bool = True,
) -> Adaptation:
    """Adapt ``params`` to the support set ``(S, C, H, W)``, ``(S,)`` with ``steps`` rule updates.

    ``net`` may be a :class:`~fewshot.models.inner_loop.stacked.StackedConv4` over ``T`` tasks of one
    support shape (``(T, S, C, H, W)``, ``(T, S)``, parameters ``(T, ...)``): the loss is the sum of
    the tasks' losses, so each task's gradient is its own, and one backward pass serves them all.

    ``create_graph=True`` keeps the graph of every inner gradient (second-order meta-gradients);
    ``False`` is first-order (and what evaluation and serving use: the adapted values are the same).
    ``head_init="prototypes"`` starts the head from the support prototypes (:func:`prototype_head`).
    ``record_losses=False`` leaves :attr:`Adaptation.losses` empty: reading them waits for the device, which a
    CUDA graph capture (:mod:`fewshot.models.inner_loop.graphs`) cannot do.
    """
    if head_init not in HEAD_INITS:
        raise ConfigError(f"unknown head initialisation {head_init!r}: use {' or '.join(HEAD_INITS)}")
    with torch.enable_grad():
        if head_init == "prototypes":
            params = prototype_head(net, params, support, labels)
        elif head_init == "shared":
            params = shared_head(params, labels)
        elif head_init == "centroid":
            params = centroid_head(net, params, support, labels)
        names = rule.adapted_names()
        # the adapted tensors need a gradient; the others only where they already have one (meta-training):
        # a served loop then builds no graph through the fixed parameters (the frozen statistics' norms, ...)
        adapted = set(names)
        params = {k: v.detach().requires_grad_(True) if k in adapted and not v.requires_grad else v for k, v in params.items()}

        def task_losses(p: Params, step: int) -> torch.Tensor:
            return net.task_losses(net.forward(p, support, step=step), labels)

        def support_loss(p: Params, step: int) -> torch.Tensor:
            return task_losses(p, step).sum()

        ctx = rule.begin(params, support_loss)
        per_step: list[Params] = []
        losses: list[Any] = []  # per step: the support loss, a float (for stacked tasks a list, one per task)
        for t in range(steps):
            checkpoint(f"inner step {t}")
            eff = rule.effective(params, ctx, t)
            values = task_losses(eff, t)  # () for one task, (T,) for stacked tasks (their sum: independent gradients)
            loss = values.sum()
            extra = rule.extra(ctx)
            # retain_graph: in first-order meta-training the outer graph (through the rule's own
            # parameters, e.g. CxGrad's scaling) shares nodes with this loss and must survive it.
            grads = torch.autograd.grad(loss, [eff[n] for n in names] + extra, create_graph=create_graph, retain_graph=True)
            params, ctx = rule.update(
                t, eff, dict(zip(names, grads[: len(names)])), list(grads[len(names) :]), loss if create_graph else loss.detach(), ctx
            )
            if not create_graph:
                params = {k: v.detach().requires_grad_(True) if k in adapted and not v.requires_grad else v for k, v in params.items()}
            per_step.append(params)
            if record_losses:
                losses.append(values.detach().tolist())
    return Adaptation(params, per_step, losses, ctx)


def pack(params: Params, stats: BNStats | None, dtype: torch.dtype = torch.float32) -> tuple[Params, BNStats | None]:
    """The task's tensors as views of one buffer of ``dtype``: one allocation per task instead of one
    per tensor, made after the inner loop's temporaries are freed, so a cache of many tasks holds about
    their bytes (BENCHMARKS.md: per-tensor allocations interleaved with those temporaries held 1.5-7x);
    ``float16`` halves it (``--task-dtype``)."""
    tensors = list(params.values()) + [x for pair in stats or [] for x in pair]
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
    views, start = [], 0
    for t in tensors:
        view = flat[start : start + t.numel()].view(t.shape)
        view.copy_(t.detach())
        views.append(view)
        start += t.numel()
    packed = dict(zip(params, views))
    rest = views[len(params) :]
    return packed, ([(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)] if stats is not None else None)


@dataclass
class InnerLoopTask:
    """Adapted weights of one task (detached) and, in ``support`` mode, the frozen BatchNorm statistics."""

    net: MetaConv4
    params: Params
    bn_mode: str
    bn_stats: BNStats | None
    step: int
    support_losses: list[float]

    @property
    def transductive(self) -> bool:
        return self.bn_mode == "transductive"

    def weights(self) -> tuple[Params, BNStats | None]:
        """Parameters and statistics in float32 (the stored ones may be float16: ``--task-dtype``)."""
        if next(iter(self.params.values())).dtype == torch.float32:
            return self.params, self.bn_stats
        stats = [(m.float(), v.float()) for m, v in self.bn_stats] if self.bn_stats is not None else None
        return {k: v.float() for k, v in self.params.items()}, stats

    @torch.no_grad()
    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` -> ``(Q, N)`` logits (on the CPU)."""
        params, stats = self.weights()
        device = next(iter(params.values())).device
        return self.net.forward(params, query.to(device), stats, step=self.step).cpu()

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` -> ``(Q, N)`` probabilities."""
        return torch.softmax(self.logits(query), dim=1)


class InnerLoopAdapter:
    """Adapter of the MAML family: ``adapt`` runs the inner loop, the task keeps the adapted weights."""

    def __init__(
        self,
        net: MetaConv4,
        rule: UpdateRule,
        meta_params: Params,
        steps: int,
        bn_mode: str = "support",
        dtype: torch.dtype = torch.float32,
        precision: torch.dtype = torch.float32,
        head_init: str = "learned",
        stem: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``dtype``: what the adapted weights are held in (:func:`pack`); ``precision``: what the inner
        loop computes in (``bfloat16``: autocast, on CPUs with native bfloat16 or on CUDA; the weights,
        gradients and the frozen statistics stay float32). ``stem``: what computes the fixed stem of a
        network with ``adapt_from`` > 0 (``stem.onnx`` in ONNX Runtime; default the torch blocks)."""
        if bn_mode not in BN_MODES:
            raise ConfigError(f"unknown BatchNorm mode {bn_mode!r}: use {' or '.join(BN_MODES)}")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"unknown head initialisation {head_init!r}: use {' or '.join(HEAD_INITS)}")
        self.net, self.rule, self.steps, self.bn_mode, self.dtype = net, rule, steps, bn_mode, dtype
        self.precision, self.head_init, self.stem = precision, head_init, stem
        self.meta_params = {k: v.detach() for k, v in meta_params.items()}

    def _check(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(labels.max()) + 1
        if self.head_init == "learned" and n != self.net.ways:
            raise ConfigError(f"this model adapts {self.net.ways}-way tasks, got {n} classes")
        device = next(iter(self.meta_params.values())).device
        return support.to(device), labels.to(device)

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> InnerLoopTask:
        support, labels = self._check(support, labels)
        # channels-last: the convolutions and pools of the loop vectorise over channels (1.5-1.75x on
        # Tiny ImageNet's 64x64 inputs, BENCHMARKS.md); values equal to float rounding
        support = support.contiguous(memory_format=torch.channels_last)
        with torch.autocast(support.device.type, dtype=self.precision, enabled=self.precision != torch.float32):
            net: MetaConv4 | NetworkTail = self.net
            inputs: torch.Tensor | StemColumns = support
            if self.net.adapt_from:  # a fixed stem runs once; the loop runs the adapted blocks on its output
                net = self.net.tail()
                stem = self.net.stem(self.meta_params, support) if self.stem is None else self.stem(support).to(support.device)
                inputs = StemColumns.of(stem)  # the first adapted convolution as a matrix product (network.StemColumns)
            result = inner_loop(net, self.rule, self.meta_params, inputs, labels, self.steps, create_graph=False, head_init=self.head_init)
        params = {k: v.detach() for k, v in result.params.items()}
        stats = support_statistics(self.net, params, support, self.steps) if self.bn_mode == "support" else None
        params, stats = pack(params, stats, self.dtype)
        return InnerLoopTask(self.net, params, self.bn_mode, stats, self.steps, result.losses)

    def stacks(self, shapes: list[tuple[int, ...]]) -> bool:
        """Whether tasks of these support shapes adapt as one stacked call (:meth:`adapt_many`; a shared
        head also needs one number of classes, which it checks). A prototype head does not stack."""
        return bool(self.rule.stackable) and self.head_init in ("learned", "shared") and len(set(shapes)) == 1

    def adapt_many(self, supports: list[torch.Tensor], labels: list[torch.Tensor]) -> list[InnerLoopTask]:
        """Several tasks at once: one stacked inner loop (:mod:`fewshot.models.inner_loop.stacked`) when
        the rule allows it and the support shapes agree, else one :meth:`adapt` each. Equal to
        :meth:`adapt` per task to float rounding."""
        from fewshot.models.inner_loop.stacked import stacked_inner_loop

        ways = {int(y.max()) + 1 for y in labels}
        if len(supports) == 1 or not self.stacks([tuple(x.shape) for x in supports]) or len(ways) > 1:
            return [self.adapt(x, y) for x, y in zip(supports, labels)]
        checked = [self._check(x, y) for x, y in zip(supports, labels)]
        with torch.autocast(checked[0][0].device.type, dtype=self.precision, enabled=self.precision != torch.float32):
            return stacked_inner_loop(
                self.net,
                self.rule,
                self.meta_params,
                [x for x, _ in checked],
                [y for _, y in checked],
                self.steps,
                self.bn_mode,
                self.dtype,
                self.head_init,
            )
