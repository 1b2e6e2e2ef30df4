"""Feature extractors: normalised images ``(B, C, H, W)`` -> features ``(B, d)``.

Two interchangeable backends run the same backbone: torch eager (``TorchFeatures``) and ONNX
Runtime (``OnnxFeatures``; about 8x faster on CPU). Evaluation and serving use the same classes.
"""

from __future__ import annotations

import io
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fewshot.models import interrupt

ONNX_OPSET = 17
#: Images per backbone run inside an interruptible (server) call: the stage between two checks.
CHUNK = 256


class FeatureExtractor(Protocol):
    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float32 normalised -> ``(B, d)`` float32."""


class TorchFeatures:
    """Backbone in torch, eval mode, no grad."""

    def __init__(self, backbone: nn.Module, device: torch.device | str = "cpu") -> None:
        self.backbone = backbone.eval().to(device)
        self.device = torch.device(device)
        self.feature_dim = int(backbone.feature_dim)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images.to(self.device)).float().cpu()


def backbone_to_onnx(backbone: nn.Module, channels: int, size: int) -> bytes:
    """Serialise ``backbone.features`` to a single-file ONNX model with a dynamic batch axis
    (input ``images``, output ``features``)."""
    backbone = backbone.eval().cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone, (torch.zeros(2, channels, size, size),), buf, dynamo=False,
                          input_names=["images"], output_names=["features"], opset_version=ONNX_OPSET,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    return buf.getvalue()


def onnx_providers(device: str = "auto") -> list[str]:
    """CUDA provider first when asked for (or ``auto``) and available, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxFeatures:
    """Backbone in ONNX Runtime (in process)."""

    def __init__(self, model: bytes | str, feature_dim: int, device: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model, opts, providers=onnx_providers(device))
        self.input_name = self.session.get_inputs()[0].name
        self.feature_dim = feature_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        if interrupt.active() and len(x) > CHUNK:  # an interruptible call runs in stages
            parts = []
            for start in range(0, len(x), CHUNK):
                interrupt.checkpoint(f"backbone images {start}..{min(start + CHUNK, len(x)) - 1}")
                parts.append(self.session.run(None, {self.input_name: x[start:start + CHUNK]})[0])
            return torch.from_numpy(np.concatenate(parts))
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
