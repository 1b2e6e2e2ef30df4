"""Serialising a task's adapted state to bytes (safetensors) and back.

Only what the adapter produced is stored, as the task describes itself (``task.to_stored()``: a head's
state, or the inner loop's adapted weights and frozen BatchNorm statistics), and, beside it, the
support set it was adapted on (:class:`StoredSupport`: the decoded pixels, labels and request
settings), which UpdateTask re-adapts on with the new images; the cached task does not hold it. The model-level parts
(ONNX sessions, the network definition) come from the served model's family when a task is loaded
(:meth:`~fewshot.models.family.Family.decode`), so a stored task is small and is classified by the same
code as a fresh one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fewshot.errors import FewShotError
from fewshot.models.family import Family, Task


class StateError(FewShotError, ValueError):
    """A stored task that this server cannot restore (another model version or a damaged record)."""


#: Prefix of the support set's tensors in a stored task.
SUPPORT = "support."


@dataclass
class StoredSupport:
    """The support set of a task: ``pixels (S, H, W, C)`` as decoded (0..255; uint8 unless an image
    came as a float tensor with fractional values), the class label of each image and the request's
    settings by API name (re-applied when the task is re-adapted)."""

    pixels: np.ndarray
    names: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    #: The request's unlabeled images (``(U, H, W, C)`` as decoded; AdaptRequest.unlabeled), which the task's
    #: report reads again after an UpdateTask; ``None``: none were sent.
    unlabeled: np.ndarray | None = None

    def compact(self) -> np.ndarray:
        """The pixels as uint8 when that loses nothing (normalising either gives the same values)."""
        p = self.pixels
        if p.dtype != np.uint8 and np.array_equal(p, np.clip(np.rint(p), 0, 255)):
            return p.astype(np.uint8)
        return p


def dump_task(task: Task, support: StoredSupport | None = None, report: dict[str, Any] | None = None) -> bytes:
    """The adapted state of ``task`` (and its support set, and its support-set report's JSON form) as one
    safetensors blob (tensors + JSON metadata)."""
    if not hasattr(task, "to_stored"):
        raise TypeError(f"cannot store a task of type {type(task).__name__}")
    tensors, meta = task.to_stored()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    extra = {}
    if support is not None:
        labels = list(dict.fromkeys(support.names))
        index = {n: i for i, n in enumerate(labels)}
        tensors[SUPPORT + "pixels"] = torch.from_numpy(np.ascontiguousarray(support.compact()))
        tensors[SUPPORT + "targets"] = torch.as_tensor([index[n] for n in support.names], dtype=torch.int32)
        if support.unlabeled is not None and len(support.unlabeled):
            tensors[SUPPORT + "unlabeled"] = torch.from_numpy(np.ascontiguousarray(support.unlabeled))
        extra["support"] = json.dumps({"labels": labels, "settings": support.settings})
    if report is not None:
        extra["report"] = json.dumps(report)
    return st_save(tensors, metadata={"fewshot": json.dumps(meta), **extra})


def _read(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors: dict[str, torch.Tensor] = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        return tensors, json.loads(blob[8 : 8 + header_len])["__metadata__"]
    except Exception as exc:  # safetensors raises its own error types
        raise StateError(f"stored task is damaged ({exc})") from None


def load_support(blob: bytes) -> StoredSupport | None:
    """The support set stored beside a task (``None`` for a task stored without one, before UpdateTask)."""
    tensors, metadata = _read(blob)
    if "support" not in metadata or SUPPORT + "pixels" not in tensors:
        return None
    info = json.loads(metadata["support"])
    names = [info["labels"][int(t)] for t in tensors[SUPPORT + "targets"]]
    unlabeled = tensors[SUPPORT + "unlabeled"].numpy() if SUPPORT + "unlabeled" in tensors else None
    return StoredSupport(tensors[SUPPORT + "pixels"].numpy(), names, info.get("settings", {}), unlabeled)


def load_report(blob: bytes) -> dict[str, Any] | None:
    """The support-set report stored with a task (:func:`fewshot.models.report.Report.to_dict`), or ``None``
    (adapted without one). Reads the blob's header only."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
    except (ValueError, TypeError) as exc:
        raise StateError(f"stored task is damaged ({exc})") from None
    return json.loads(metadata["report"]) if "report" in metadata else None


def load_task(blob: bytes, model: Family) -> Any:
    """Rebuild a task stored by :func:`dump_task` for ``model`` (its support set is not loaded)."""
    tensors, metadata = _read(blob)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(SUPPORT)}
    try:
        meta = json.loads(metadata["fewshot"])
    except (KeyError, ValueError) as exc:
        raise StateError(f"stored task is damaged ({exc})") from None
    try:
        return model.decode(tensors, meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"stored {meta.get('kind', 'unknown')} task cannot be restored ({exc})") from None
