"""Triton python-backend model that runs the ``model.onnx`` beside it in ONNX Runtime (CPU).

``fewshot export --triton-backend python`` copies this file as ``<model>/1/model.py``: the variant of the
repository for Triton builds without the ``onnxruntime_onnx`` backend. It serves exactly the inputs and
outputs its ``config.pbtxt`` declares (read from the same ONNX graph). With ``max_batch_size > 0`` the
requests Triton's dynamic batcher hands over are concatenated along the batch axis, run as one call,
and split back; otherwise each request runs alone.

Self-contained on purpose (numpy, onnxruntime and Triton's ``triton_python_backend_utils`` only), so it
runs in any Triton python environment, whether or not ``fewshot`` is installed there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class TritonPythonModel:
    """ONNX Runtime session over ``model.onnx``; ``threads`` (config parameter, default 1) intra-op threads."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("threads", "1"))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        return {name: self.pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}

    def _response(self, arrays: list[np.ndarray]) -> Any:
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(n, a) for n, a in zip(self.outputs, arrays)])

    def _error(self, exc: Exception) -> Any:
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(exc).__name__}: {exc}"))

    def execute(self, requests: list[Any]) -> list[Any]:
        if not self.batched:
            out = []
            for request in requests:
                try:
                    out.append(self._response(self.session.run(self.outputs, self._feeds(request))))
                except Exception as exc:  # bad input: answer this request with the error, keep serving
                    out.append(self._error(exc))
            return out
        try:
            feeds = [self._feeds(r) for r in requests]
            sizes = [len(f[self.inputs[0]]) for f in feeds]
            merged = {name: np.concatenate([f[name] for f in feeds]) for name in self.inputs}
            results = self.session.run(self.outputs, merged)
        except Exception as exc:
            return [self._error(exc) for _ in requests]
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(r, bounds) for r in results]
        return [self._response([parts[i] for parts in per_output]) for i in range(len(requests))]
