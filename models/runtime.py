"""Where heavy work runs: the one device pick for torch, the one ONNX Runtime session factory, and the
engines that run a model's ONNX parts (in process, in torch, or in Triton) with the Triton signature
each part must have.

``fewshot eval``, training, export parity, the server and the bundles' adapters all call these, so
"use CUDA when present, else the CPU" is decided in one place. (The Triton python-backend wrapper
``export/triton_onnx_model.py`` is copied into model repositories and stays self-contained.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fewshot.errors import ConfigError, EnvironmentUnavailable

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


#: Environment variable: ``1`` lets ONNX Runtime's threads spin between runs (its default; off here).
SPIN_ENV = "FEWSHOT_ORT_SPIN"


def onnx_session(model: bytes | str, device: str = "auto", threads: int = 0) -> Any:
    """An ONNX Runtime ``InferenceSession`` of ``model`` (bytes or a path) on ``device``, with
    ``threads`` intra-op threads (0: ONNX Runtime's default) and only errors logged."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if os.environ.get(SPIN_ENV) != "1":
        # ONNX Runtime's intra-op threads spin after each run by default; beside the torch inner loop, the gRPC
        # threads and the decoding on the same cores that spinning took their CPU (BENCHMARKS.md, "Speed under load"):
        # an Adapt with the stem in ONNX Runtime waited on them. FEWSHOT_ORT_SPIN=1 turns it back on.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=onnx_providers(device))


# -- engines: what runs a model's ONNX parts ---------------------------------------------------------
class Session(Protocol):
    """What runs one ONNX part: ONNX Runtime's ``InferenceSession.run`` call, which the torch stand-in
    (:class:`TorchSession`), Triton (``fewshot.server.triton_backend``) and Triton's BLS
    (``fewshot.server.triton_models``) also offer."""

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``feeds`` by input name -> the outputs (here always one)."""


class Engines(Protocol):
    """Where a model's parts run: ``session(part)`` for each ONNX part it declares (``backbone``, ``network``)."""

    def session(self, part: str) -> Session:
        """The session of ``part`` (:class:`ConfigError` when this model has no such part)."""

    def has(self, part: str) -> bool:
        """Whether ``part`` runs here (an optional part may be absent)."""


Source = bytes | str | Path | Callable[[], bytes]


class OnnxEngines:
    """In-process ONNX Runtime sessions of a model's parts, made on first use from a file, bytes or a
    function returning bytes (a shipped model exports its graphs in memory only when asked)."""

    def __init__(self, sources: Mapping[str, Source], device: str = "auto", threads: int = 0) -> None:
        self.sources, self.device, self.threads = dict(sources), device, threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def has(self, part: str) -> bool:
        return part in self.sources

    def session(self, part: str) -> Any:
        with self._lock:
            if part not in self._sessions:
                if part not in self.sources:
                    raise ConfigError(f"this model has no {part} graph (it has {', '.join(sorted(self.sources)) or 'none'})")
                src = self.sources[part]
                src = src() if callable(src) else src
                self._sessions[part] = onnx_session(str(src) if isinstance(src, Path) else src, self.device, self.threads)
            return self._sessions[part]


class TorchSession:
    """A torch module behind the :class:`Session` call (``fewshot eval --backend torch``): the feeds named
    ``input_names`` are its positional arguments, its one output the result."""

    def __init__(self, module: torch.nn.Module, input_names: list[str], device: str = "auto") -> None:
        self.device = torch_device(device)
        self.module, self.input_names = module.eval().to(self.device), list(input_names)

    @torch.no_grad()
    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        return [self.module(*args).float().cpu().numpy()]


class SessionEngines:
    """Engines from ready sessions (torch stand-ins, Triton, BLS), by part name."""

    def __init__(self, sessions: Mapping[str, Session]) -> None:
        self.sessions = dict(sessions)

    def has(self, part: str) -> bool:
        return part in self.sessions

    def session(self, part: str) -> Session:
        if part not in self.sessions:
            raise ConfigError(f"this model has no {part} graph (it has {', '.join(sorted(self.sessions)) or 'none'})")
        return self.sessions[part]


# -- Triton signatures -------------------------------------------------------------------------------
def part_model_name(model: str, part: str) -> str:
    """The Triton model serving ``part`` of ``model``: ``<model>_<part>`` (``..._backbone``, ``..._network``)."""
    return f"{model}_{part}"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton's model metadata reports it (batch axis included, ``-1``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class Signature:
    """The Triton model a part needs and the tensors it must have."""

    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def problems(self, metadata: dict[str, Any]) -> list[str]:
        """What differs between this signature and ``get_model_metadata(as_json=True)``."""
        out = []
        for kind, expected in (("input", self.inputs), ("output", self.outputs)):
            served = {
                t["name"]: TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t.get("shape", ())))
                for t in metadata.get(f"{kind}s", ())
            }
            for spec in expected:
                got = served.get(spec.name)
                if got is None:
                    out.append(f"{self.model} has no {kind} {spec.name!r} (it has {', '.join(sorted(served)) or 'none'})")
                elif got != spec:
                    out.append(f"{self.model} {kind} is {got.describe()}, the bundle needs {spec.describe()}")
        return out
