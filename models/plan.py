"""How a task classifies, as a plan the server's batcher can merge across requests.

``task.plan()`` returns a :class:`ClassifyPlan`: ``heavy`` is the batch-invariant, per-image part
(backbone features; the adapted network under frozen BatchNorm statistics), which requests with the same
``key`` may run together in one call; ``finish`` is the per-request rest (the head on features, a
softmax). ``task.classify(x)`` *is* ``plan.run(x)``, so ``fewshot eval``, the gRPC service and the
Triton models all run the same code, merged or not. ``key`` is ``None`` when the heavy part depends on
the whole batch (transductive BatchNorm): such a request always runs alone. ``group``, where set,
merges requests of different tasks of one model into one call (:mod:`fewshot.models.inner_loop.stacked`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from fewshot.models.calibration import OpenSetCalibration

#: Given a request's query images: ``(key, item, run_many)`` to merge it with requests of *other*
#: tasks (``run_many([item, ...])`` -> one ``(Q, N)`` calibrated-logit tensor per item), or ``None``.
Group = Callable[[torch.Tensor], "tuple[Hashable, Any, Callable[[list[Any]], list[Any]]] | None"]


@dataclass(frozen=True)
class ClassifyPlan:
    """``(Q, C, H, W)`` query images -> ``finish(heavy(x))``: ``(Q, N)`` calibrated logits."""

    key: Hashable | None
    heavy: Callable[[torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]
    #: Cross-task merging (inner-loop tasks of one network, stacked weights), where the model enables it.
    group: Group | None = None

    def run(self, query: torch.Tensor) -> torch.Tensor:
        """The plan alone, unmerged: what ``calibrated_logits`` returns."""
        return self.finish(self.heavy(query))


def finish_each(outputs: list[torch.Tensor], finishes: list[Callable[[torch.Tensor], Any]]) -> list[Any]:
    """``finish(output)`` per request of a merged call; a ``finish`` that raises gives its exception as
    that request's result, and the others keep their answers."""
    results: list[Any] = []
    for out, finish in zip(outputs, finishes):
        try:
            results.append(finish(out))
        except Exception as exc:  # this request's head failed
            results.append(exc)
    return results


class PlannedTask:
    """Base of the adapted tasks: ``classify`` is ``softmax(plan().run)`` and a task is transductive when
    its state is. Subclasses hold a ``state`` and their :class:`~fewshot.models.calibration.OpenSetCalibration`
    (``open_set``), and say how they classify in :meth:`plan`."""

    state: Any
    open_set: OpenSetCalibration

    @property
    def transductive(self) -> bool:
        return bool(self.state.transductive)

    def plan(self) -> ClassifyPlan:
        raise NotImplementedError

    def calibrated_logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised images -> ``(Q, N)`` calibrated logits (``plan().run``)."""
        return self.plan().run(query)

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised images -> ``(Q, N)`` calibrated probabilities."""
        return torch.softmax(self.calibrated_logits(query), dim=1)
