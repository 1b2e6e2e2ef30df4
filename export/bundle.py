"""``fewshot export``: one versioned, self-contained bundle per model.

A bundle ``DIR/<name>/`` holds ``backbone.onnx`` (images -> features), for inner-loop models
``network.onnx`` (the classifier with its weights and BatchNorm statistics as inputs),
``meta.safetensors`` (everything adaptation needs) and ``manifest.json`` (schema-versioned, with the
sha256 of every file). Parity with torch is checked before anything is written; an export that
does not meet it fails with the measured figure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fewshot.errors import FewShotError
from fewshot.models.card import MANIFEST_SCHEMA
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import family_of, open_shipped
from fewshot.models.features import ONNX_OPSET
from fewshot.models.inner_loop.family import NetworkAdapter
from fewshot.models.inner_loop.onnx_network import network_inputs
from fewshot.models.runtime import OnnxEngines, onnx_session
from fewshot.models.zoo import load_model

SCHEMA_VERSION = MANIFEST_SCHEMA
BUNDLE_VERSION = "1"
FP32_TOLERANCE = 1e-4
FP16_MIN_AGREEMENT = 99.5
#: Where bundles go and are served from by default: ``$FEWSHOT_BUNDLES``, else ``bundles`` in the
#: working directory (never derived from where the package is installed).
DEFAULT_BUNDLE_DIR = Path(os.environ.get("FEWSHOT_BUNDLES", "bundles"))


class ExportError(FewShotError, RuntimeError):
    """Raised when an export cannot be made or fails its parity check."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _session(model_bytes: bytes):
    return onnx_session(model_bytes, "cpu")


def _to_fp16(model_bytes: bytes) -> bytes:
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load_from_string(model_bytes), keep_io_types=True)
    return model.SerializeToString()


def _real_images(model, count: int = 256, seed: int = 0) -> torch.Tensor:
    data = load_dataset(model.card.dataset, "test", spec=model.spec)
    idx = np.sort(np.random.default_rng(seed).choice(len(data.images), min(count, len(data.images)), replace=False))
    return model.spec.normalize(data.images[idx])


def _part_parity(model, part: str, onnx_bytes: bytes, feeds: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(max abs difference, max abs torch output) of ONNX ``part`` against the torch module on ``feeds``."""
    ref, got = model.torch_parts("cpu")[part], _session(onnx_bytes)
    worst = scale = 0.0
    for f in feeds:
        a, b = ref.run(None, f)[0], got.run(None, f)[0]
        worst, scale = max(worst, float(np.abs(a - b).max())), max(scale, float(np.abs(a).max()))
    return worst, scale


def _check_fp32(name: str, file: str, diff: float, scale: float) -> None:
    """fp32 parity holds when the max abs difference is within ``FP32_TOLERANCE`` times the output
    scale (at least 1): float32 rounding grows with the magnitude of the activations, and the body of
    a meta network (BatchNorm with unit running statistics) produces features in the hundreds."""
    if diff > FP32_TOLERANCE * max(1.0, scale):
        raise ExportError(f"{name}: {file} differs from torch by {diff:.2e} > {FP32_TOLERANCE} x max(1, {scale:.3g})")


def _network_feeds(model, tasks: int = 4) -> list[dict[str, np.ndarray]]:
    """``network.onnx`` feeds with the adapted weights of ``tasks`` real tasks and their queries, the
    tasks cycling over the smallest, 5 and the largest number of classes the model adapts (up to 10)."""
    data = load_dataset(model.card.dataset, "test", spec=model.spec)
    family = open_shipped(model, "torch", "cpu")
    lo, hi = family.way_range()
    shots = int(model.card.training["config"]["shots"])
    samplers = [EpisodeSampler(data, w, shots, 15, seed=0) for w in sorted({lo, max(lo, min(5, hi)), min(10, hi)})]
    network = family.adapter(bn_mode="support")
    assert isinstance(network, NetworkAdapter), f"{model.name} is not an inner-loop model"
    adapter = network.adapter
    feeds = []
    for i in range(tasks):
        ep = samplers[i % len(samplers)].episode(i)
        state = adapter.adapt(model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
        weights = network_inputs(state.net, state.params, state.bn_stats, state.step)
        feeds.append({k: v.numpy() for k, v in weights.items()} | {"images": model.spec.normalize(data.images[ep.query]).numpy()})
    return feeds


def _fp16_agreement(model, fp32: dict[str, bytes], fp16: dict[str, bytes], tasks: int = 600) -> float:
    """Top-1 agreement (%) of the model's default method served from fp16 against fp32 graphs, on the
    queries of ``tasks`` real 1-shot tasks (the family objects the server builds from a bundle)."""
    data = load_dataset(model.card.dataset, "test", spec=model.spec)
    parts = lambda files: {k.removesuffix(".onnx"): v for k, v in files.items()}  # noqa: E731  (a one-line local helper)
    card = model.card.to_dict()
    a32 = family_of(card)(card, model.meta_tensors(), OnnxEngines(parts(fp32), "cpu")).adapter()
    f16 = family_of(card)(card, model.meta_tensors(), OnnxEngines(parts(fp16), "cpu"))
    a16 = f16.adapter()
    lo, hi = f16.way_range()
    sampler = EpisodeSampler(data, max(lo, min(5, hi)), 1, 15, seed=0)
    same = total = 0
    for i in range(tasks):
        ep = sampler.episode(i)
        xs, ys, xq = (
            model.spec.normalize(data.images[ep.support]),
            torch.as_tensor(ep.support_labels),
            model.spec.normalize(data.images[ep.query]),
        )
        p32, p16 = a32.adapt(xs, ys).classify(xq).argmax(1), a16.adapt(xs, ys).classify(xq).argmax(1)
        same, total = same + int((p32 == p16).sum()), total + len(p32)
    return 100.0 * same / total


def export_model(
    name: str,
    out_dir: Path = DEFAULT_BUNDLE_DIR,
    fp16: bool = False,
    triton_repo: Path | None = None,
    log=print,
    triton_backend: str = "onnxruntime_onnx",
    triton_state_dir: Path | None = None,
    version: str | None = None,
    served_as: str | None = None,
) -> Path:
    """Export shipped model ``name`` into ``out_dir/<name>/`` (with ``version``: ``out_dir/<name>/<version>/``, the
    versioned layout a server loads side by side); returns the bundle folder. ``served_as``: the model name the
    bundle serves under (a retrained model replacing another: default, its own). The folder appears whole (written
    beside it, then renamed), so a server watching the directory never sees half of it. With ``triton_repo``, also
    write its Triton models there (:func:`fewshot.export.triton.write_bundle_models`: ``triton_backend``
    ``onnxruntime_onnx`` or ``python``, tasks of ``fewshot_adapt`` in ``triton_state_dir``)."""
    if version is not None and not version.isdigit():
        raise ExportError(f"--version {version!r}: a version is a positive integer (Triton's NAME/VERSION/ layout)")
    model = load_model(name)
    name = served_as or model.name
    started = time.perf_counter()
    files = {f"{part}.onnx": export() for part, export in model.onnx_parts().items()}
    parity: dict[str, Any] = {"images": 256, "tolerance": FP32_TOLERANCE}
    images = _real_images(model)
    feeds = {"backbone": [{"images": images.numpy()}], "network": _network_feeds(model) if "network.onnx" in files else []}
    feeds["stem"] = feeds["backbone"]
    for part, what in (
        ("backbone", f"{len(images)} real images"),
        ("stem", f"{len(images)} real images"),
        ("network", "adapted weights of real tasks"),
    ):
        if f"{part}.onnx" not in files:
            continue
        diff, scale = _part_parity(model, part, files[f"{part}.onnx"], feeds[part])
        parity[f"{part}_max_abs_diff"], parity[f"{part}_scale"] = diff, scale
        log(f"{name}: {part}.onnx fp32 parity on {what}: max abs diff {diff:.2e} (outputs up to {scale:.3g})")
        _check_fp32(name, f"{part}.onnx", diff, scale)
    if fp16:
        half = {k: _to_fp16(v) for k, v in files.items()}
        parity["fp16_top1_agreement"] = _fp16_agreement(model, files, half)
        parity["fp16_tasks"] = 600
        log(f"{name}: fp16 top-1 agreement with fp32 on 600 real tasks: {parity['fp16_top1_agreement']:.2f}%")
        if parity["fp16_top1_agreement"] < FP16_MIN_AGREEMENT:
            raise ExportError(f"{name}: fp16 agrees with fp32 on {parity['fp16_top1_agreement']:.2f}% < {FP16_MIN_AGREEMENT}%")
        files = half
    bundle = out_dir / name if version is None else out_dir / name / version
    bundle.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.", dir=bundle.parent))
    for fname, blob in files.items():
        (staging / fname).write_bytes(blob)
    tensors = model.meta_tensors()
    save_file(tensors, str(staging / "meta.safetensors"))
    manifest = build_manifest(model, sorted(files) + ["meta.safetensors"], staging, parity, fp16, "center" in tensors)
    manifest["name"] = name
    if version is not None:
        manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    staging.chmod(0o755)
    if bundle.exists():
        shutil.rmtree(bundle)
    staging.rename(bundle)
    if triton_repo is not None:
        from fewshot.export.registry import Bundle
        from fewshot.export.triton import write_bundle_models

        write_bundle_models(triton_repo, Bundle(bundle, manifest), triton_backend, triton_state_dir)
    log(f"{name}: bundle written to {bundle} ({time.perf_counter() - started:.1f} s)")
    return bundle


def _graph_inputs(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def build_manifest(model, file_names: list[str], bundle: Path, parity: dict, fp16: bool, centered: bool) -> dict[str, Any]:
    """The manifest of ``bundle``, built from the model's card (:meth:`ModelCard.manifest`): the files
    with their sha256, the parity figures, each ONNX part's inputs and where the centering vector is."""
    card = model.card
    files = {f: {"sha256": sha256(bundle / f), "bytes": (bundle / f).stat().st_size} for f in file_names}
    extra: dict[str, Any] = {}
    if "network.onnx" in file_names:
        extra["network_inputs"] = _graph_inputs(bundle / "network.onnx")
    meta = card.manifest(
        card.feature_dim or _graph_output_dim(bundle / "backbone.onnx"),
        files,
        parity,
        "fp16" if fp16 else "fp32",
        ONNX_OPSET,
        source_fingerprint(model.path),
        BUNDLE_VERSION,
        extra,
    )
    if centered:
        meta["heads"] = dict(card.heads) | {"centering_vector": {"file": "meta.safetensors", "tensor": "center"}}
    return meta


def _graph_output_dim(path: Path) -> int:
    """The feature size of a backbone graph (its output's last axis)."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


#: What this exporter writes into a bundle; a bundle of an older exporter is exported again by ``make demo`` and
#: the benchmarks (it still serves: 2 added the optional ``stem.onnx`` of inner-loop networks with a fixed stem).
EXPORTER = "2"


def source_fingerprint(model_path: Path) -> dict[str, str]:
    """sha256 of the shipped model's weights and card, so a stale bundle is detected after retraining,
    re-tuning or re-measuring (a new head in the card, new accuracy figures), and the exporter's :data:`EXPORTER`."""
    return {
        "weights_sha256": sha256(model_path / "weights.safetensors"),
        "card_sha256": sha256(model_path / "card.json"),
        "exporter": EXPORTER,
    }


def bundle_is_current(bundle_dir: Path, model_path: Path) -> bool:
    """True when ``bundle_dir`` holds a manifest exported from the current weights of ``model_path``."""
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("source") == source_fingerprint(model_path)
