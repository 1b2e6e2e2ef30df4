"""Many tasks of one network in one call: per-task weights stacked along a task axis.

The idea of multi-adapter servers (S-LoRA, Punica: requests for thousands of adapters in one batched
kernel), for :class:`~fewshot.models.inner_loop.network.MetaConv4`: ``T`` tasks' conv weights
``(T, O, I, 3, 3)`` become one grouped convolution (``groups=T``) over their images laid side by side
along the channel axis ``(B, T*I, H, W)``; BatchNorm is per channel, so per task; the heads are one
batched matrix product. The result equals ``T`` separate :meth:`MetaConv4.forward` calls to float
rounding (tested), in one call of about twenty ops instead of twenty per task.

Used where tasks of one model meet: Classify requests of different inner-loop tasks (the server's
batcher merges them, :class:`StackedClassify`) and concurrent Adapts (:func:`stacked_inner_loop`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fewshot.models.inner_loop.engine import InnerLoopTask, inner_loop, pack
from fewshot.models.inner_loop.network import BNStats, MetaConv4, Params
from fewshot.models.inner_loop.rules import UpdateRule
from fewshot.models.plan import finish_each


def stack(params: Sequence[Params]) -> Params:
    """``T`` parameter dicts -> one dict of ``(T, ...)`` tensors."""
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def unstack(params: Params, t: int) -> Params:
    """Task ``t``'s parameters of a stacked dict (views: :func:`~fewshot.models.inner_loop.engine.pack` copies them)."""
    return {k: v[t] for k, v in params.items()}


def stacked_forward(
    net: MetaConv4, params: Params, x: torch.Tensor, bn_stats: BNStats | None = None, step: int | None = None, record: BNStats | None = None
) -> torch.Tensor:
    """``(T, B, C, H, W)`` images of ``T`` tasks, ``params`` stacked ``(T, ...)`` -> logits ``(T, B, ways)``.

    The same computation as :meth:`MetaConv4.forward` per task: ``bn_stats`` holds ``(T, O)`` means
    and variances (frozen, ``support`` mode) or is ``None`` (each task's batch statistics, transductive);
    ``record`` receives the ``(T, O)`` batch statistics of each layer."""
    suffix = f".{min(step or 0, net.per_step_bn - 1)}" if net.per_step_bn else ""
    tasks, batch = x.shape[:2]
    h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
    for l in range(4):
        w = params[f"conv{l}.weight"]
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=1, groups=tasks)
        gamma, beta = params[f"bn{l}.weight{suffix}"].reshape(-1), params[f"bn{l}.bias{suffix}"].reshape(-1)
        if bn_stats is None:
            if record is not None:
                record.append((h.mean(dim=(0, 2, 3)).view(tasks, -1), h.var(dim=(0, 2, 3), unbiased=False).view(tasks, -1)))
            h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=net.bn_eps)
        else:
            mean, var = bn_stats[l]
            h = F.batch_norm(h, mean.reshape(-1), var.reshape(-1), gamma, beta, training=False, eps=net.bn_eps)
        h = F.relu(F.max_pool2d(h, 2)) if l < net.pools else F.relu(h)  # as MetaConv4.forward
    features = h.reshape(batch, tasks, -1).transpose(0, 1)  # (T, B, d), each task's flatten order
    if net.transform == "CL2N":
        features = features - params["center"].unsqueeze(1)
    if net.transform:
        features = F.normalize(features, dim=-1)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), features, params["head.weight"].transpose(1, 2))


class StackedConv4:
    """``T`` tasks of a :class:`MetaConv4` as one network for the inner loop: ``forward`` is
    :func:`stacked_forward`, ``task_losses`` each task's mean cross-entropy ``(T,)``."""

    def __init__(self, net: MetaConv4) -> None:
        self.net = net

    def forward(
        self, params: Params, x: torch.Tensor, bn_stats: BNStats | None = None, step: int | None = None, record: BNStats | None = None
    ) -> torch.Tensor:
        return stacked_forward(self.net, params, x, bn_stats, step, record)

    def task_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(T, S, N)`` logits, ``(T, S)`` labels -> ``(T,)`` losses."""
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)


def stacked_inner_loop(
    net: MetaConv4,
    rule: UpdateRule,
    meta_params: Params,
    supports: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    steps: int,
    bn_mode: str,
    dtype: torch.dtype = torch.float32,
    head_init: str = "learned",
) -> list[InnerLoopTask]:
    """Adapt ``T`` tasks of one support shape ``(S, C, H, W)`` together (first-order, as serving):
    the same tasks as ``T`` calls of :class:`~fewshot.models.inner_loop.engine.InnerLoopAdapter` to float
    rounding (tested). ``rule.stackable`` must hold; with ``head_init="shared"`` every task has the same
    number of classes ``N`` (the shared row is replicated to ``N`` rows once, for all of them)."""
    from fewshot.models.inner_loop.engine import shared_head

    tasks = len(supports)
    if head_init == "shared":
        meta_params = shared_head(meta_params, labels[0])
    params = {k: v.detach().expand(tasks, *v.shape).contiguous() for k, v in meta_params.items()}
    x, y = torch.stack(list(supports)), torch.stack(list(labels))
    stacked = StackedConv4(net)
    result = inner_loop(stacked, rule, params, x, y, steps, create_graph=False)  # type: ignore[arg-type]
    adapted = {k: v.detach() for k, v in result.params.items()}
    stats: BNStats | None = None
    if bn_mode == "support":
        stats = []
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # float32 statistics, as classification
            stacked_forward(net, adapted, x, None, steps, record=stats)
    losses = list(zip(*result.losses))  # per step, per task -> per task, per step
    tasks_out = []
    for t in range(tasks):  # each task packed into its own buffer: none pins the stack
        params, mine = pack(unstack(adapted, t), [(m[t], v[t]) for m, v in stats] if stats is not None else None, dtype)
        tasks_out.append(InnerLoopTask(net, params, bn_mode, mine, steps, list(losses[t])))
    return tasks_out


#: Query counts a merged call pads to: requests of up to 16 queries merge with others of their bucket.
BUCKETS = (1, 2, 4, 8, 16)


def bucket(queries: int) -> int | None:
    """The padded query count of a request of ``queries`` images, or ``None`` (too many to merge)."""
    return next((b for b in BUCKETS if queries <= b), None)


class StackedClassify:
    """Classify requests of different support-BatchNorm tasks of one network as one stacked call.

    ``run_many([(state, images, finish), ...])`` returns ``finish(logits)`` for each request (or the
    exception its ``finish`` raised); ``state`` is an :class:`~fewshot.models.inner_loop.engine.InnerLoopTask`
    and every request's images are padded with zeros to the longest (each query is independent under
    frozen statistics, so padding changes nothing else)."""

    def __init__(self, net: MetaConv4) -> None:
        self.net = net

    @torch.no_grad()
    def logits(self, states: Sequence[Any], images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per task ``(Q_t, C, H, W)`` -> ``(Q_t, ways)`` logits, in one stacked call."""
        longest = max(len(x) for x in images)
        weights = [s.weights() for s in states]
        params = stack([p for p, _ in weights])
        x = torch.zeros(len(images), longest, *images[0].shape[1:], device=params["head.bias"].device)
        for t, q in enumerate(images):
            x[t, : len(q)] = q
        stats = [(torch.stack([st[l][0] for _, st in weights]), torch.stack([st[l][1] for _, st in weights])) for l in range(4)]
        out = stacked_forward(self.net, params, x, stats, step=states[0].step)
        out = out.cpu()
        return [out[t, : len(q)] for t, q in enumerate(images)]

    def run_many(self, items: Sequence[tuple[Any, torch.Tensor, Callable[[torch.Tensor], Any]]]) -> list[Any]:
        return finish_each(self.logits([s for s, _, _ in items], [x for _, x, _ in items]), [f for _, _, f in items])
