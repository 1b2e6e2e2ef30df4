"""The inner loop as a CUDA graph for one support shape (prepared for GPUs; ``scripts/gpu-bench.sh`` measures it).

On a GPU the inner loop of a small network is bound by kernel launches, not arithmetic: five steps of a forward
and a backward through one block and a head are a few hundred small kernels. A CUDA graph records them once for a
fixed shape (support images, classes) and replays them with one launch. :class:`GraphedAdapter` adapts like
:class:`~fewshot.models.inner_loop.engine.InnerLoopAdapter` (same stem, same head start, same rule, same steps) with
the loop itself replayed from a graph captured on the first task of each shape; the graph reads the task's stem
columns, labels and starting head from static buffers it owns. It covers networks with a fixed stem and a head
that starts from the support set (``centroid``), in ``support`` BatchNorm mode, on CUDA. It is not served yet:
the server adopts it once the GPU figures show it equal to the eager loop (within 1e-5) and faster.
"""

from __future__ import annotations

from typing import Any

import torch

from fewshot.errors import ConfigError
from fewshot.models.inner_loop.engine import InnerLoopAdapter, InnerLoopTask, centroid_head, inner_loop, pack
from fewshot.models.inner_loop.network import StemColumns, support_statistics


class _Captured:
    """One captured loop: its static inputs (stem columns, labels, head) and its output parameters."""

    def __init__(self, adapter: InnerLoopAdapter, cols: StemColumns, labels: torch.Tensor, head: dict[str, torch.Tensor]) -> None:
        self.cols = StemColumns(cols.cols.clone(), cols.batch, cols.height, cols.width)
        self.labels = labels.clone()
        self.head = {k: v.detach().clone() for k, v in head.items()}
        tail, meta = adapter.net.tail(), adapter.meta_params

        def run() -> dict[str, torch.Tensor]:
            params = {**meta, **self.head}
            out = inner_loop(tail, adapter.rule, params, self.cols, self.labels, adapter.steps, head_init="learned", record_losses=False)
            return {k: v.detach() for k, v in out.params.items()}

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run()

    def replay(self, cols: StemColumns, labels: torch.Tensor, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.cols.cols.copy_(cols.cols)
        self.labels.copy_(labels)
        for k, v in head.items():
            self.head[k].copy_(v)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()}


class GraphedAdapter:
    """``adapt(support, labels) -> InnerLoopTask`` with the loop replayed from a CUDA graph per support shape."""

    def __init__(self, adapter: InnerLoopAdapter) -> None:
        device = next(iter(adapter.meta_params.values())).device
        if device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device")
        if not adapter.net.adapt_from or adapter.head_init != "centroid" or adapter.bn_mode != "support":
            raise ConfigError("the graphed loop covers networks with a fixed stem, a centroid head start and support BatchNorm")
        self.adapter, self.device = adapter, device
        self._graphs: dict[tuple[Any, ...], _Captured] = {}

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> InnerLoopTask:
        a = self.adapter
        support, labels = support.to(self.device), labels.to(self.device)
        stem = a.net.stem(a.meta_params, support) if a.stem is None else a.stem(support).to(self.device)
        cols = StemColumns.of(stem)
        if not isinstance(cols, StemColumns):
            return a.adapt(support, labels)  # too large for the columns: the eager loop
        with torch.enable_grad():
            started = centroid_head(a.net.tail(), a.meta_params, cols, labels)
        head = {k: started[k].detach() for k in ("head.weight", "head.bias")}
        key = (tuple(cols.cols.shape), tuple(head["head.weight"].shape))
        if key not in self._graphs:
            self._graphs[key] = _Captured(a, cols, labels, head)
        params = {**a.meta_params, **self._graphs[key].replay(cols, labels, head)}
        packed, stats = pack(params, support_statistics(a.net, params, support, a.steps), a.dtype)
        return InnerLoopTask(a.net, packed, a.bn_mode, stats, a.steps, [])
