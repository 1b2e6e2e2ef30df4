"""Serialising a task's adapted state to bytes (safetensors) and back.

Only what the adapter produced is stored, as the task describes itself (``task.to_stored()``: a head's
state, or the inner loop's adapted weights and frozen BatchNorm statistics). The model-level parts
(ONNX sessions, the network definition) come from the served model's family when a task is loaded
(:meth:`~fewshot.models.family.Family.decode`), so a stored task is small and is classified by the same
code as a fresh one.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fewshot.errors import FewShotError
from fewshot.models.family import Family, Task


class StateError(FewShotError, ValueError):
    """A stored task that this server cannot restore (another model version or a damaged record)."""


def dump_task(task: Task) -> bytes:
    """The adapted state of ``task`` as one safetensors blob (tensors + JSON metadata)."""
    if not hasattr(task, "to_stored"):
        raise TypeError(f"cannot store a task of type {type(task).__name__}")
    tensors, meta = task.to_stored()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"fewshot": json.dumps(meta)})


def load_task(blob: bytes, model: Family) -> Any:
    """Rebuild a task stored by :func:`dump_task` for ``model``."""
    try:
        tensors: dict[str, torch.Tensor] = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + header_len])["__metadata__"]["fewshot"])
    except Exception as exc:  # safetensors raises its own error types
        raise StateError(f"stored task is damaged ({exc})") from None
    try:
        return model.decode(tensors, meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"stored {meta.get('kind', 'unknown')} task cannot be restored ({exc})") from None
