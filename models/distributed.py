"""Data-parallel training across processes and hosts (``torchrun ... -m fewshot.cli train ...``).

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` in the environment) every process joins one
``torch.distributed`` group: NCCL when it trains on CUDA, Gloo on CPU. Rank ``r`` of ``W`` takes the work
items ``r, r + W, r + 2W, ...`` of each step (the tasks of a meta-batch, the images of a supervised
batch, whose features are then gathered so a batch-wide loss sees them all), the gradients are summed
over ranks (all-reduce) before the one optimizer step every rank takes, so every rank holds the same
weights; only rank 0 writes checkpoints, metrics and progress. Alone (no ``torchrun``) it is one rank
and every call is a no-op, so the single-process path is the same code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls, device: torch.device) -> Ranks:
        """Join the ``torchrun`` group if there is one (NCCL on CUDA, Gloo on CPU); else one rank."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def writer(self) -> bool:
        """Whether this rank writes checkpoints, metrics and progress (rank 0)."""
        return self.rank == 0

    def mine(self, items: int) -> range:
        """This rank's share of ``items`` work items: ``rank, rank + world, ...``."""
        return range(self.rank, items, self.world)

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over ranks (a missing one counts as zero)."""
        if self.world == 1:
            return
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for p, g in zip(params, grads):
            p.grad = flat[start : start + g.numel()].view_as(g).clone()
            start += g.numel()

    def scale_gradients(self, params: Iterable[torch.Tensor], factor: float) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0, rank by rank, differentiable (the backward
        pass hands each rank the gradient of its own part, summed over the ranks' losses)."""
        if self.world == 1:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few floats over ranks (losses and accuracies for the log)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast(self, params: Iterable[torch.Tensor]) -> None:
        """Every rank starts from rank 0's weights."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together: a last barrier, so that no rank tears its connections down while
        another still has work on them (a rank then aborted in Gloo's teardown, once, on a loaded machine)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
