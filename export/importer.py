"""``fewshot import``: the user's own ONNX image embedder as a metric bundle.

Any ONNX graph that maps a float batch of images ``(N, C, S, S)`` to one feature vector per image ``(N, D)``
becomes a bundle of the metric family (nearest centroid, LaplacianShot, logistic regression), served like a
shipped one in process and through Triton. The graph is checked (one image input of the declared channels
and size, a free batch axis, a 2-D float output; it must run in ONNX Runtime on a batch of 2 and give finite
features) and its input and output are renamed ``images`` and ``features`` (the bundle's interface); nothing
else in it changes. Optional data:

* ``sample_folder``: images (any layout) whose mean feature becomes the centering vector (the ``CL2N``
  transform of the direct-sum paper); without it, features are only L2-normalised (``L2N``).
* ``val_folder``: one subfolder per class; the transform and each head's settings are tuned on its seeded
  tasks (:func:`fewshot.models.tuning.tune_heads`, as ``fewshot package``) and every method is calibrated for
  open-set rejection on it. Without it, :func:`default_heads` (the settings tuned for the shipped Tiny
  ImageNet direct-sum model) and uncalibrated probabilities.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fewshot.errors import FewShotError
from fewshot.export.bundle import BUNDLE_VERSION, sha256
from fewshot.models.card import CARD_SCHEMA, ModelCard
from fewshot.models.metric_adapter import MetricFamily
from fewshot.models.preprocess import InputSpec

#: Images of ``sample_folder`` used for the centering vector (an even spread when it holds more).
SAMPLE_LIMIT = 5000
#: Seeded validation tasks for head tuning and calibration when ``val_folder`` is given.
TUNE_TASKS, CALIBRATION_TASKS, SEED = 300, 300, 0


class ImportError_(FewShotError, ValueError):
    """Raised when an ONNX file is not an image embedder the server can serve; the message says what to change."""


def default_heads(transform: str) -> dict[str, Any]:
    """Head settings of an imported model without a validation folder: those tuned for the shipped Tiny
    ImageNet direct-sum model (natural images), under ``transform``."""
    return {
        "centroid": {"transform": transform},
        "laplacianshot": {"knn": 3, "lambda": {"1": 0.5, "5": 0.3}, "transform": transform, "rectify": True},
        "logreg": {
            "transform": transform,
            "weight_decay": {"1": 0.03, "5": 0.01},
            "steps": 100,
            "weight_decay_grid": [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1],
        },
    }


def _dims(value_info: Any) -> list[int | str]:
    """A graph input's or output's shape: ints where fixed, the symbol (or ``?``) where free."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


def check_embedder(model: Any, channels: int, size: int, output: str | None = None) -> tuple[str, str]:
    """``(input name, output name)`` of ``model`` (an ``onnx.ModelProto``) if it is an image embedder for
    ``channels`` x ``size`` x ``size`` images; otherwise :class:`ImportError_` saying what is wrong."""
    from onnx import TensorProto

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ImportError_(
            f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an image "
            "embedder takes one: a batch of images (N, C, H, W)"
        )
    (x,) = inputs
    shape = _dims(x)
    if x.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportError_(
            f"input {x.name!r} is not float32 (ONNX element type {x.type.tensor_type.elem_type}); export the model in float32"
        )
    if len(shape) != 4:
        raise ImportError_(f"input {x.name!r} has shape {shape}; an image embedder takes (N, C, H, W)")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise ImportError_(
            f"input {x.name!r} has a fixed batch of {shape[0]}; export with a dynamic batch axis "
            "(torch.onnx.export(..., dynamic_axes={'INPUT': {0: 'batch'}, 'OUTPUT': {0: 'batch'}}))"
        )
    if isinstance(shape[1], int) and shape[1] != channels:
        raise ImportError_(f"input {x.name!r} takes {shape[1]} channels, not --channels {channels}")
    for axis, side in zip(("height", "width"), shape[2:]):
        if isinstance(side, int) and side not in (0, size):
            raise ImportError_(f"input {x.name!r} takes images of {axis} {side}, not --input-size {size}")
    outputs = {o.name: o for o in graph.output}
    if output is None:
        if len(outputs) != 1:
            raise ImportError_(f"the graph has {len(outputs)} outputs ({', '.join(outputs)}); name the feature vector with --output")
        output = next(iter(outputs))
    if output not in outputs:
        raise ImportError_(f"the graph has no output {output!r}; its outputs are {', '.join(outputs)}")
    out_shape = _dims(outputs[output])
    if out_shape and len(out_shape) != 2:
        raise ImportError_(
            f"output {output!r} has shape {out_shape}; an image embedder gives one vector per "
            "image (N, D): flatten it in the model before exporting"
        )
    return x.name, output


def _renamed(model: Any, old_in: str, old_out: str) -> bytes:
    """``model`` with its input called ``images`` and its (only kept) output ``features``."""
    import onnx

    graph = model.graph
    names = {old_in: "images", old_out: "features"}
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for i in graph.input:
        if i.name == old_in:
            i.name = "images"
    keep = [o for o in graph.output if o.name == old_out]
    del graph.output[:]
    graph.output.extend(keep)
    graph.output[0].name = "features"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def import_onnx(
    onnx_path: Path,
    name: str,
    spec: InputSpec,
    out_dir: Path,
    sample_folder: Path | None = None,
    val_folder: Path | None = None,
    output: str | None = None,
    triton_repo: Path | None = None,
    tune_tasks: int = TUNE_TASKS,
    calibration_tasks: int = CALIBRATION_TASKS,
    log: Callable[[str], None] = print,
    triton_backend: str = "onnxruntime_onnx",
) -> Path:
    """Write the metric bundle ``out_dir/name`` of the ONNX embedder at ``onnx_path``; returns its folder."""
    import onnx

    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Bundle, load_bundle
    from fewshot.models.data import decode_file, load_image_folder
    from fewshot.models.features import SessionFeatures
    from fewshot.models.folders import sample_files
    from fewshot.models.packaging import calibrate_family, image_features
    from fewshot.models.runtime import onnx_session
    from fewshot.models.tuning import TuningTasks, tune_heads

    started = time.perf_counter()
    try:
        model = onnx.load(str(onnx_path))
    except FileNotFoundError:
        raise ImportError_(f"{onnx_path}: no such file") from None
    except Exception as exc:
        raise ImportError_(f"{onnx_path} is not an ONNX model: {exc}") from exc
    old_in, old_out = check_embedder(model, spec.channels, spec.size, output)
    graph = _renamed(model, old_in, old_out)
    session = onnx_session(graph, "cpu")
    try:
        probe = session.run(
            None, {"images": np.random.default_rng(SEED).standard_normal((2, spec.channels, spec.size, spec.size)).astype(np.float32)}
        )[0]
    except Exception as exc:
        raise ImportError_(f"{onnx_path} does not run on a batch of 2 {spec.channels}x{spec.size}x{spec.size} images: {exc}") from exc
    if probe.ndim != 2 or probe.shape[0] != 2 or not np.isfinite(probe).all():
        raise ImportError_(
            f"{onnx_path} gave {probe.shape} {'finite' if np.isfinite(probe).all() else 'non-finite'} "
            "outputs for 2 images; an image embedder gives 2 finite vectors"
        )
    dim = int(probe.shape[1])
    features = image_features(SessionFeatures(session, dim), spec)
    tensors: dict[str, torch.Tensor] = {}
    center = None
    if sample_folder is not None:
        files = sample_files(sample_folder, SAMPLE_LIMIT)
        center = features(np.stack([decode_file(f, spec) for f in files])).mean(0)
        tensors["center"] = center.contiguous()
        log(f"{name}: centering vector from {len(files)} images of {sample_folder}")
    record: dict[str, Any] = {}
    val = None
    if val_folder is not None:
        val = load_image_folder(val_folder, spec)
        heads, record = tune_heads(TuningTasks(features(val.images), val, center, tune_tasks, SEED))
        log(f"{name}: heads tuned on {tune_tasks} tasks of {val.num_classes} classes of {val_folder}: {record['accuracy']}")
    else:
        heads = default_heads("CL2N" if center is not None else "L2N")
    card = ModelCard.from_dict(
        {
            "schema": CARD_SCHEMA,
            "name": name,
            "family": MetricFamily.family,
            "method": "imported ONNX embedder",
            "architecture": {
                "arch": "onnx",
                "file": Path(onnx_path).name,
                "sha256": sha256(Path(onnx_path)),
                "input_name": old_in,
                "output_name": old_out,
            },
            "input": spec.to_dict(),
            "feature_dim": dim,
            "training": {"command": "fewshot import", "seed": SEED, "imported_from": str(onnx_path)},
            "data": {
                "dataset": None,
                "sample_folder": str(sample_folder) if sample_folder else None,
                "val_folder": str(val_folder) if val_folder else None,
            },
            "default_head": "centroid",
            "heads": heads,
            "limits": {"max_ways": 50, "max_shots": 50},
            "accuracy": {},
            **({"head_tuning": record} if record else {}),
        }
    )
    bundle = out_dir / name
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "backbone.onnx").write_bytes(graph)
    save_file(tensors, str(bundle / "meta.safetensors"))  # empty without a sample folder
    manifest = _manifest(
        card, bundle, center is not None, opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    )
    if val is not None:  # calibrated on the bundle's own family object, before its manifest is written
        block = calibrate_family(open_bundle(Bundle(bundle, manifest), "cpu"), name, val, calibration_tasks, SEED, log=log)
        if block:
            manifest["open_set"] = block
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    loaded = load_bundle(bundle)  # verified as the server will verify it
    if triton_repo is not None:
        from fewshot.export.triton import write_bundle_models

        write_bundle_models(triton_repo, Bundle(loaded.path, loaded.manifest), triton_backend)
    log(f"{name}: bundle of {onnx_path} written to {bundle} ({dim}-d features, {time.perf_counter() - started:.1f} s)")
    return bundle


def _manifest(card: ModelCard, bundle: Path, centered: bool, opset: int) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {
        f: {"sha256": sha256(bundle / f), "bytes": (bundle / f).stat().st_size} for f in ("backbone.onnx", "meta.safetensors")
    }
    source = {"weights_sha256": files["backbone.onnx"]["sha256"], "card_sha256": ""}
    parity = {"imported": True}  # the graph is the model: nothing to compare it with
    assert card.feature_dim is not None  # an imported card always states it (measured from the graph)
    meta = card.manifest(card.feature_dim, files, parity, "fp32", opset, source, BUNDLE_VERSION)
    if centered:
        meta["heads"] = dict(card.heads) | {"centering_vector": {"file": "meta.safetensors", "tensor": "center"}}
    return meta


def parse_floats(text: str, channels: int, what: str) -> tuple[float, ...]:
    """``--mean`` / ``--std``: comma-separated floats in [0, 1] units, one per channel (or one for all)."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ImportError_(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ImportError_(f"--{what} has {len(values)} values for {channels} channels")
    if what == "std" and min(values) <= 0:
        raise ImportError_("--std values must be positive")
    return values


__all__: Sequence[str] = ["ImportError_", "check_embedder", "default_heads", "import_onnx", "parse_floats"]
