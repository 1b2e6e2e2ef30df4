"""Feature extractors: normalised images ``(B, C, H, W)`` -> features ``(B, d)``.

Two interchangeable backends run the same backbone: torch eager (``TorchFeatures``) and ONNX
Runtime (``OnnxFeatures``; about 8x faster on CPU). Evaluation and serving use the same classes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from fewshot.models import interrupt
from fewshot.models.runtime import onnx_session

ONNX_OPSET = 17
#: Images per ONNX Runtime run. On CPU, 32-image runs of the Tiny ImageNet Conv-4 were as fast as
#: one large run and kept ONNX Runtime's arena at 230 MB instead of 960 MB over mixed batch sizes up
#: to 256 (BENCHMARKS.md, "Memory"); a GPU is given larger runs. Each run is also a stage boundary
#: at which an abandoned server call stops (:mod:`fewshot.models.interrupt`).
CPU_RUN_BATCH, GPU_RUN_BATCH = 32, 256


def run_batch(session: Any) -> int:
    """Images per run for a session: an ONNX Runtime session's by the provider it runs on; another
    session's own ``max_batch`` if it has one (Triton's BLS), else unlimited (Triton splits on its own)."""
    if not hasattr(session, "get_providers"):
        return int(getattr(session, "max_batch", 1 << 30))
    return GPU_RUN_BATCH if "CUDAExecutionProvider" in session.get_providers() else CPU_RUN_BATCH


def run_in_chunks(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, chunk: int) -> np.ndarray:
    """``run`` over ``x`` in runs of at most ``chunk`` images along axis 0, concatenated."""
    if len(x) <= chunk:
        interrupt.checkpoint(f"backbone images 0..{len(x) - 1}")
        return run(x)
    parts = []
    for start in range(0, len(x), chunk):
        interrupt.checkpoint(f"backbone images {start}..{min(start + chunk, len(x)) - 1}")
        parts.append(run(x[start : start + chunk]))
    return np.concatenate(parts)


class FeatureExtractor(Protocol):
    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float32 normalised -> ``(B, d)`` float32."""


class TorchFeatures:
    """Backbone in torch, eval mode, no grad."""

    def __init__(self, backbone: nn.Module, device: torch.device | str = "cpu") -> None:
        self.backbone = backbone.eval().to(device)
        self.device = torch.device(device)
        self.feature_dim = int(cast(int, backbone.feature_dim))  # a plain int attribute (torch's stubs: Tensor | Module)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images.to(self.device)).float().cpu()


def backbone_to_onnx(backbone: nn.Module, channels: int, size: int, output: str = "features") -> bytes:
    """Serialise ``backbone`` (its ``forward``) to a single-file ONNX model with a dynamic batch axis
    (input ``images``, output ``output``)."""
    backbone = backbone.eval().cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone,
            (torch.zeros(2, channels, size, size),),
            buf,  # type: ignore[arg-type]  # torch's stub: the TorchScript exporter takes a file object too
            dynamo=False,
            input_names=["images"],
            output_names=[output],
            opset_version=ONNX_OPSET,
            dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}},
        )
    return buf.getvalue()


class SessionFeatures:
    """The backbone part of a model run by a :class:`~fewshot.models.runtime.Session` (ONNX Runtime,
    torch, Triton), in runs of at most :func:`run_batch` images."""

    def __init__(self, session: Any, feature_dim: int) -> None:
        self.session, self.feature_dim = session, int(feature_dim)
        self.run_batch = run_batch(session)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        run = lambda part: self.session.run(None, {"images": part})[0]  # noqa: E731  (a one-line local helper)
        return torch.from_numpy(run_in_chunks(run, x, self.run_batch))


class OnnxFeatures(SessionFeatures):
    """Backbone in ONNX Runtime (in process)."""

    def __init__(self, model: bytes | str, feature_dim: int, device: str = "auto", threads: int = 0) -> None:
        super().__init__(onnx_session(model, device, threads), feature_dim)
