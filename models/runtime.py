"""Where heavy work runs: the one device pick for torch and the one ONNX Runtime session factory.

``fewshot eval``, training, export parity, the server and the bundles' adapters all call these, so
"use CUDA when present, else the CPU" is decided in one place. (The Triton python-backend wrapper
``export/triton_onnx_model.py`` is copied into model repositories and stays self-contained.)
"""

from __future__ import annotations

from typing import Any

import torch

from fewshot.errors import EnvironmentUnavailable

DEVICES = ("auto", "cpu", "cuda")


def torch_device(name: str = "auto", strict: bool = False) -> torch.device:
    """``auto``: CUDA when available, else the CPU. ``cuda`` without a GPU falls back to the CPU, or with
    ``strict`` (training, where the user asked for it) raises :class:`EnvironmentUnavailable`."""
    if name == "cuda" and not torch.cuda.is_available():
        if strict:
            raise EnvironmentUnavailable("--device cuda asked for, but no CUDA device is available")
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def onnx_providers(device: str = "auto") -> list[str]:
    """CUDA provider first when asked for (or ``auto``) and available, CPU always."""
    import onnxruntime as ort

    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(model: bytes | str, device: str = "auto", threads: int = 0) -> Any:
    """An ONNX Runtime ``InferenceSession`` of ``model`` (bytes or a path) on ``device``, with
    ``threads`` intra-op threads (0: ONNX Runtime's default) and only errors logged."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=onnx_providers(device))
