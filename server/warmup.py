"""Warming every served model up before the server accepts calls (as Triton's ``model_warmup`` does).

A fresh process pays one-time costs on its first calls: ONNX Runtime and oneDNN pick and build kernels
for each input shape, torch's autograd and allocator warm up, Python imports lazily. ``warm_up`` runs
``rounds`` synthetic tasks per model and method (random images of the model's input shape, the
smallest task it takes at 5 shots, then Classify of 1 and 8 queries) through the same adapters and
sessions that serve requests, and nothing of it is stored. ``fewshot serve`` calls it before it opens
its port, so the first client call is served as fast as later ones (BENCHMARKS.md, "Cold start").
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from fewshot.models.family import Family

#: Shots per class and query counts of the synthetic tasks.
WARM_SHOTS, WARM_QUERIES = 5, (1, 8)


def warm_up(models: Mapping[str, Family], rounds: int = 1, seed: int = 0) -> dict[str, float]:
    """Seconds spent per model (all its methods, ``rounds`` tasks each)."""
    spent: dict[str, float] = {}
    generator = torch.Generator().manual_seed(seed)
    for name, model in models.items():
        start = time.perf_counter()
        lo, hi = model.way_range()
        ways = max(lo, min(5, hi))
        shape = (model.spec.channels, model.spec.size, model.spec.size)
        labels = torch.arange(ways).repeat_interleave(WARM_SHOTS)
        for method in model.methods:
            adapter = model.adapter(method, shots=WARM_SHOTS)
            for _ in range(rounds):
                task = adapter.adapt(torch.randn(len(labels), *shape, generator=generator), labels)
                for q in WARM_QUERIES:
                    task.classify(torch.randn(q, *shape, generator=generator))
        spent[name] = round(time.perf_counter() - start, 3)
    return spent
