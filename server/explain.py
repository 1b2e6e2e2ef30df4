"""Answers that explain themselves (issue 37): the support images nearest each query in the task's feature space.

A task's support features (``task.embed``: the metric head's transformed backbone features, or what an adapted
network's head reads) are computed from the support set stored with the task the first time a Classify asks
for explanations, and kept in :class:`SupportFeatures`, a cache bounded in bytes; the queries' features come
from one more pass over them. Similarity is the cosine of the two feature vectors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from fewshot.models.family import Family
from fewshot.server.errors import InvalidRequest, NotFound
from fewshot.server.store import TaskRecord
from fewshot.server.tasks import stored_support
from fewshot_proto import fewshot_pb2 as pb

#: The most nearest support images a Classify may ask for per query.
MAX_EXPLAIN = 10
#: Bytes of support features kept across tasks (least recently used first out; part of the memory bound,
#: :func:`fewshot.server.memory.peak_bound_mb`).
CACHE_BYTES = 32 << 20


def check_explain(k: int) -> int:
    """The request's ``explain`` (0: none), :class:`InvalidRequest` past :data:`MAX_EXPLAIN`."""
    if k > MAX_EXPLAIN:
        raise InvalidRequest(
            f"explain {k} asks for more than {MAX_EXPLAIN} nearest support images per query: ask for at most {MAX_EXPLAIN}"
        )
    return k


def nearest(query: torch.Tensor, support: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, d)``, ``(S, d)`` features -> ``((Q, k) cosine similarities, (Q, k) support indices)``, nearest first
    (``k`` at most ``S``; ties by the lower index)."""
    q = torch.nn.functional.normalize(query.double(), dim=1)
    s = torch.nn.functional.normalize(support.double(), dim=1)
    sim = q @ s.T
    order = torch.argsort(-sim, dim=1, stable=True)[:, : min(k, len(support))]
    return sim.gather(1, order), order


class SupportFeatures:
    """Support features by ``(task id, version, model digest)``, least recently used out past ``max_bytes``."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, str], tuple[torch.Tensor, list[int]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, record: TaskRecord, task: Any, model: Family, state: Callable[[], bytes]) -> tuple[torch.Tensor, list[int]]:
        """``((S, d) features, (S,) label index of each image)`` of the task's stored support set (blocking: on a miss,
        ``state()`` reads the stored task, and one feature pass runs); :func:`~fewshot.server.tasks.stored_support`'s
        errors for a task stored without its support images."""
        key = (record.task_id, record.version, record.model_digest)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        support = stored_support(record.state or state(), record.task_id, "cannot be explained")
        index = {n: i for i, n in enumerate(record.labels)}
        value = (task.embed(model.spec.normalize(support.pixels)).float(), [index[n] for n in support.names])
        size = value[0].numel() * 4
        with self._lock:
            if key not in self._items and size <= self.max_bytes:
                self._items[key] = value
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (old, _) = self._items.popitem(last=False)
                    self._bytes -= old.numel() * 4
        return value


def explain(
    response: pb.ClassifyResponse,
    record: TaskRecord,
    task: Any,
    model: Family,
    x: torch.Tensor,
    k: int,
    cache: SupportFeatures,
    state: Callable[[], bytes],
    embedded: bool = False,
) -> None:
    """Fill each prediction of ``response`` with the ``k`` support images nearest its query ``x`` (``(Q, C, H, W)``
    normalised, or with ``embedded`` already the queries' ``(Q, d)`` features: ``task.logits_and_embeddings``);
    ``state()`` reads the task's stored state when its support features are not cached."""
    support, labels = cache.get(record, task, model, state)
    similarity, order = nearest(x if embedded else task.embed(x), support, k)
    for prediction, sims, idx in zip(response.predictions, similarity.tolist(), order.tolist()):
        for s, i in zip(sims, idx):
            prediction.nearest.add(index=i, label=record.labels[labels[i]], similarity=s)


def stored_state(store: Any, task_id: str, tenant: str) -> Callable[[], bytes]:
    """What reads ``task_id``'s stored state for :meth:`SupportFeatures.get` (:class:`NotFound` once it is gone)."""

    def read() -> bytes:
        record = store.record(task_id, tenant)
        if record is None:
            raise NotFound(f"task {task_id} is unknown, deleted or expired")
        return bytes(record.state)

    return read
