"""Serialising a task's adapted state to bytes (safetensors) and back.

Only what the adapter produced is stored: a head's state as it describes itself
(:meth:`HeadState.to_stored`: nearest-centroid prototypes, LaplacianShot's support features, ...), or the
inner loop's adapted weights and frozen BatchNorm statistics. The model-level parts
(ONNX sessions, the network definition) come from the served model when a task is loaded, so a stored
task is small and is classified by the same code as a fresh one.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fewshot.errors import FewShotError
from fewshot.export.loader import BundleModel, OnnxInnerLoopTask
from fewshot.models.heads import centroid, laplacian_shot  # noqa: F401  (registers their state kinds)
from fewshot.models.heads.base import STATE_KINDS
from fewshot.models.meta.inner_loop import InnerLoopTask
from fewshot.models.metric_adapter import MetricTask


class StateError(FewShotError, ValueError):
    """A stored task that this server cannot restore (another model version or a damaged record)."""


def dump_task(task: MetricTask | OnnxInnerLoopTask) -> bytes:
    """The adapted state of ``task`` as one safetensors blob (tensors + JSON metadata)."""
    tensors: dict[str, torch.Tensor]
    if isinstance(task, MetricTask) and task.state.kind:
        tensors, meta = task.state.to_stored()
        meta = {"kind": task.state.kind, **meta}
    elif isinstance(task, OnnxInnerLoopTask):
        s = task.state
        tensors = {f"param.{k}": v for k, v in s.params.items()}
        for i, (mean, var) in enumerate(s.bn_stats or []):
            tensors[f"bn.{i}.mean"], tensors[f"bn.{i}.var"] = mean, var
        meta = {"kind": "inner_loop", "bn_mode": s.bn_mode, "step": s.step, "bn_layers": len(s.bn_stats or []),
                "support_losses": s.support_losses}
    else:
        raise TypeError(f"cannot store a task of type {type(task).__name__}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"fewshot": json.dumps(meta)})


def load_task(blob: bytes, model: BundleModel) -> MetricTask | OnnxInnerLoopTask:
    """Rebuild a task stored by :func:`dump_task` for ``model``."""
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + header_len])["__metadata__"]["fewshot"])
    except Exception as exc:  # safetensors raises its own error types
        raise StateError(f"stored task is damaged ({exc})") from None
    kind = meta.pop("kind", None)
    if kind in STATE_KINDS:
        try:
            return MetricTask(STATE_KINDS[kind].from_stored(tensors, meta), model.extract)
        except (KeyError, TypeError) as exc:
            raise StateError(f"stored {kind} task is incomplete ({exc})") from None
    if kind == "inner_loop":
        params = {k.removeprefix("param."): v.to(model.device) for k, v in tensors.items() if k.startswith("param.")}
        stats = [(tensors[f"bn.{i}.mean"].to(model.device), tensors[f"bn.{i}.var"].to(model.device))
                 for i in range(meta["bn_layers"])] or None
        state = InnerLoopTask(model.net, params, meta["bn_mode"], stats, meta["step"], meta["support_losses"])
        return OnnxInnerLoopTask(state, model.session)
    raise StateError(f"stored task has unknown kind {kind!r}")
