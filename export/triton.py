"""Triton model repository entries for exported bundles (``fewshot export --triton-repo DIR``).

For each bundle: ``<name>_backbone`` (``backbone.onnx``: images -> features, batched by Triton) and, for
inner-loop bundles, ``<name>_network`` (``network.onnx``: images plus the task's weights and BatchNorm
statistics -> logits; not batched across requests, since every task has its own weights). Beside
them, the python-backend pair ``fewshot_adapt`` / ``fewshot_classify`` (``fewshot.server.triton_models``)
serves Adapt and Classify over KServe v2 for every bundle of the bundle directory, with the tasks in
the same store as ``fewshot serve``.

Two variants of the ONNX models, chosen by ``backend``:

- ``onnxruntime_onnx`` (production): Triton's ONNX Runtime backend, ``KIND_AUTO`` instances (a GPU
  when present, else the CPU).
- ``python``: for Triton builds without that backend (the ``tritonserver`` of the nvidia-pytriton
  wheel): ``1/model.py`` (:mod:`fewshot.export.triton_onnx_model`, copied) runs ``1/model.onnx`` in
  ONNX Runtime on the CPU, with the same inputs, outputs, dims and batching.

Every config's tensors are read from the ONNX graph it serves, so the two cannot disagree, and every
config is built through Triton's ``model_config_pb2`` schema (never string templates).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx

from fewshot.errors import ConfigError, EnvironmentUnavailable
from fewshot.export.registry import Bundle
from fewshot.models.family import parts_in
from fewshot.models.runtime import part_model_name

MAX_BATCH_SIZE = 256
QUEUE_DELAY_US = 2000
BACKENDS = ("onnxruntime_onnx", "python")
ADAPT_MODEL, CLASSIFY_MODEL = "fewshot_adapt", "fewshot_classify"
#: Threads per python-backend instance (torch and ONNX Runtime); Triton scales by instances.
PYTHON_THREADS = 1
_DATA_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32"}
_ONNX_WRAPPER = Path(__file__).with_name("triton_onnx_model.py")
#: ``model.py`` of the few-shot models: the classes live in the installed package, so the repository
#: holds no copy of the logic (the Triton python environment needs ``fewshot`` installed).
_FEWSHOT_MODEL_PY = '''"""Triton python-backend model {name}: see fewshot.server.triton_models."""
from fewshot.server.triton_models import {cls} as TritonPythonModel  # noqa: F401  (the class name Triton's python backend looks up)
'''


def backbone_model_name(name: str) -> str:
    """Triton model name of a bundle's backbone: ``<name>_backbone``."""
    return part_model_name(name, "backbone")


def network_model_name(name: str) -> str:
    """Triton model name of an inner-loop bundle's adapted network (``network.onnx``): ``<name>_network``."""
    return part_model_name(name, "network")


def _tensor(name: str, data_type: str, dims: list[int], optional: bool = False) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims, **({"optional": True} if optional else {})}


def _config(
    model_name: str,
    backend: str,
    max_batch_size: int,
    inputs: list[dict],
    outputs: list[dict],
    instances: tuple[str, int],
    parameters: dict[str, str] | None = None,
    batching: bool = False,
) -> str:
    """A ``config.pbtxt`` built through Triton's own schema (``model_config_pb2.ModelConfig``, parsed
    from a dict and written with ``text_format``, as Triton's tooling does): a field that does not
    exist fails here, not when Triton loads the model."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise EnvironmentUnavailable("writing a Triton repository needs tritonclient: pip install 'fewshot[triton]'") from None
    spec: dict[str, Any] = {
        "name": model_name,
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"kind": instances[0], "count": instances[1]}],
    }
    spec["platform" if backend == "onnxruntime_onnx" else "backend"] = backend
    if batching:
        spec["dynamic_batching"] = {"max_queue_delay_microseconds": QUEUE_DELAY_US}
    if parameters:
        spec["parameters"] = {k: {"string_value": v} for k, v in parameters.items()}
    return text_format.MessageToString(json_format.ParseDict(spec, model_config_pb2.ModelConfig()))


def _graph_tensors(values, batched: bool) -> list[dict[str, Any]]:
    """ONNX graph inputs or outputs as config entries; a dynamic axis is ``-1``, and with ``batched``
    the leading (batch) axis is left out: Triton owns it through ``max_batch_size``."""
    out = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _DATA_TYPES:
            raise ConfigError(f"tensor {v.name!r} has ONNX element type {t.elem_type}; Triton configs are written for float32")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out.append(_tensor(v.name, _DATA_TYPES[t.elem_type], dims[1:] if batched else dims))
    return out


def onnx_model_config(model_name: str, onnx_path: Path, batched: bool, backend: str = "onnxruntime_onnx") -> str:
    """``config.pbtxt`` serving ``onnx_path``. ``batched``: the first axis is the batch, merged across
    requests by dynamic batching (backbones); otherwise every request runs alone (``max_batch_size: 0``,
    the network, whose weights are per-task inputs)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown Triton backend {backend!r}: use {' or '.join(BACKENDS)}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = _graph_tensors([i for i in graph.input if i.name not in initializers], batched)
    outputs = _graph_tensors(graph.output, batched)
    if backend == "python":
        return _config(
            model_name,
            backend,
            MAX_BATCH_SIZE if batched else 0,
            inputs,
            outputs,
            ("KIND_CPU", 1),
            {"threads": str(PYTHON_THREADS)},
            batched,
        )
    return _config(model_name, backend, MAX_BATCH_SIZE if batched else 0, inputs, outputs, ("KIND_AUTO", 1), None, batched)


def write_onnx_model(
    repo: Path, model_name: str, onnx_path: Path, batched: bool, backend: str = "onnxruntime_onnx", version: str = "1"
) -> Path:
    """Write ``repo/<model_name>/{config.pbtxt, VERSION/model.onnx}`` (and ``VERSION/model.py`` for the python
    backend; Triton serves the highest version by default); returns the model folder."""
    config = onnx_model_config(model_name, onnx_path, batched, backend)
    folder = Path(repo) / model_name
    (folder / version).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / version / "model.onnx")
    if backend == "python":
        shutil.copyfile(_ONNX_WRAPPER, folder / version / "model.py")
    else:
        (folder / version / "model.py").unlink(missing_ok=True)  # a python variant written here before
    (folder / "config.pbtxt").write_text(config)
    return folder


def fewshot_model_configs(bundle_dir: Path, state_dir: Path, instances: int = 1) -> dict[str, str]:
    """``config.pbtxt`` of ``fewshot_adapt`` and ``fewshot_classify`` (the tensor contract of docs/triton.md,
    "Adapt and Classify inside Triton"). Strings travel as ``BYTES`` (``TYPE_STRING``): UTF-8 names and labels,
    encoded image bytes (anything Pillow opens). ``bundle_dir`` and ``state_dir`` become parameters;
    a relative path there is read from the repository's root."""
    params = {"bundle_dir": str(bundle_dir), "state_dir": str(state_dir), "threads": str(PYTHON_THREADS)}
    strings = "TYPE_STRING"
    adapt_in = [
        _tensor("model", strings, [1]),
        _tensor("labels", strings, [-1]),
        _tensor("images", strings, [-1]),
        _tensor("method", strings, [1], optional=True),
        _tensor("settings", strings, [1], optional=True),
    ]
    adapt_out = [_tensor("task_id", strings, [1]), _tensor("labels", strings, [-1])]
    classify_in = [
        _tensor("task_id", strings, [1]),
        _tensor("images", strings, [-1]),
        _tensor("reject_unknown", "TYPE_BOOL", [1], optional=True),
        _tensor("threshold", "TYPE_FP64", [1], optional=True),
        _tensor("target_recall", "TYPE_FP64", [1], optional=True),
        _tensor("explain", "TYPE_INT32", [1], optional=True),
    ]
    classify_out = [
        _tensor("probabilities", "TYPE_FP32", [-1, -1]),
        _tensor("labels", strings, [-1]),
        _tensor("unknown", "TYPE_BOOL", [-1]),
        _tensor("scores", "TYPE_FP64", [-1]),
        _tensor("threshold", "TYPE_FP64", [1]),
        _tensor("nearest_index", "TYPE_INT32", [-1, -1]),
        _tensor("nearest_label", strings, [-1, -1]),
        _tensor("nearest_similarity", "TYPE_FP64", [-1, -1]),
    ]
    return {
        ADAPT_MODEL: _config(ADAPT_MODEL, "python", 0, adapt_in, adapt_out, ("KIND_CPU", instances), params),
        CLASSIFY_MODEL: _config(CLASSIFY_MODEL, "python", 0, classify_in, classify_out, ("KIND_CPU", instances), params),
    }


def write_fewshot_models(repo: Path, bundle_dir: Path, state_dir: Path, instances: int = 1) -> list[Path]:
    """Write ``fewshot_adapt`` and ``fewshot_classify`` (python backend) into ``repo``; they serve every
    bundle of ``bundle_dir`` (a model whose backbone Triton has not loaded answers UNAVAILABLE), with
    tasks in ``state_dir``."""
    folders = []
    for model_name, config in fewshot_model_configs(bundle_dir, state_dir, instances).items():
        folder = Path(repo) / model_name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        cls = "AdaptModel" if model_name == ADAPT_MODEL else "ClassifyModel"
        (folder / "1" / "model.py").write_text(_FEWSHOT_MODEL_PY.format(name=model_name, cls=cls))
        (folder / "config.pbtxt").write_text(config)
        folders.append(folder)
    return folders


def write_bundle_models(repo: Path, bundle: Bundle, backend: str = "onnxruntime_onnx", state_dir: Path | None = None) -> list[Path]:
    """Everything one bundle needs in ``repo``: a Triton model per ONNX part its family declares (the
    backbone; for the inner-loop family also the network), batched as the part says. With ``state_dir``, also the few-shot pair over the bundle's directory with tasks there (opt-in:
    those models need ``fewshot`` and torch in Triton's python environment, which a stock Triton image
    lacks). Paths are written absolute."""
    folder = bundle.path.resolve()
    versioned = folder.name == bundle.version and folder.parent.name == bundle.name  # NAME/VERSION/: the same version in Triton
    version = bundle.version if versioned else "1"
    folders = [
        write_onnx_model(repo, part_model_name(bundle.name, p.name), folder / f"{p.name}.onnx", p.batched, backend, version)
        for p in parts_in(bundle.manifest)
    ]
    if state_dir is not None:
        folders += write_fewshot_models(repo, folder.parent.parent if versioned else folder.parent, Path(state_dir).resolve())
    return folders
