"""``fewshot export``: one versioned, self-contained bundle per model.

A bundle ``DIR/<name>/`` holds ``backbone.onnx`` (images -> features), for gradient-adapted models
``network.onnx`` (the classifier with its weights and BatchNorm statistics as inputs),
``meta.safetensors`` (everything adaptation needs) and ``manifest.json`` (schema-versioned, with the
sha256 of every file). Parity with torch is checked before anything is written; an export that
does not meet it fails with the measured figure.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fewshot.errors import FewShotError
from fewshot.export.onnx_graphs import ONNX_OPSET, backbone_to_onnx, network_inputs, network_to_onnx
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.features import OnnxFeatures, TorchFeatures
from fewshot.models.runtime import onnx_session
from fewshot.models.zoo import ShippedMetaModel, ShippedModel, load_model

SCHEMA_VERSION = 1
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
    data = load_dataset(model.card["data"]["dataset"], "test")
    idx = np.sort(np.random.default_rng(seed).choice(len(data.images), count, replace=False))
    return model.spec.normalize(data.images[idx])


def _backbone_parity(backbone: torch.nn.Module, onnx_bytes: bytes, images: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, max abs torch output) of the features of ``images``."""
    ref = TorchFeatures(backbone)(images)
    got = OnnxFeatures(onnx_bytes, ref.shape[1], "cpu")(images)
    return float((ref - got).abs().max()), float(ref.abs().max())


def _check_fp32(name: str, file: str, diff: float, scale: float) -> None:
    """fp32 parity holds when the max abs difference is within ``FP32_TOLERANCE`` times the output
    scale (at least 1): float32 rounding grows with the magnitude of the activations, and the body of
    a meta network (BatchNorm with unit running statistics) produces features in the hundreds."""
    if diff > FP32_TOLERANCE * max(1.0, scale):
        raise ExportError(f"{name}: {file} differs from torch by {diff:.2e} > {FP32_TOLERANCE} x max(1, {scale:.3g})")


def _network_parity(model: ShippedMetaModel, onnx_bytes: bytes, tasks: int = 4) -> tuple[float, float]:
    """(max abs difference, max abs torch logit) of ``network.onnx`` with adapted weights of real tasks."""
    data = load_dataset(model.card["data"]["dataset"], "test")
    net = model.net
    sampler = EpisodeSampler(data, net.ways, int(model.card["training"]["config"]["shots"]), 15, seed=0)
    session, worst, scale = _session(onnx_bytes), 0.0, 0.0
    adapter = model.adapter("support", device="cpu")
    for i in range(tasks):
        ep = sampler.episode(i)
        state = adapter.adapt(model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
        query = model.spec.normalize(data.images[ep.query])
        feeds = {k: v.numpy() for k, v in network_inputs(net, state.params, state.bn_stats, state.step).items()}
        got = session.run(None, {"images": query.numpy(), **feeds})[0]
        ref = state.logits(query).numpy()
        worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    return worst, scale


def _fp16_agreement(model, fp32: bytes, fp16: bytes, tasks: int = 600) -> float:
    """Top-1 agreement (%) of fp16 against fp32 predictions on the queries of ``tasks`` real tasks."""
    from fewshot.models.metric_adapter import MetricAdapter

    data = load_dataset(model.card["data"]["dataset"], "test")
    if isinstance(model, ShippedModel):
        d = model.backbone.feature_dim
        head = model.head("centroid")
        ad32, ad16 = MetricAdapter(OnnxFeatures(fp32, d, "cpu"), head), MetricAdapter(OnnxFeatures(fp16, d, "cpu"), head)
        sampler = EpisodeSampler(data, 5, 1, 15, seed=0)
        same = total = 0
        for i in range(tasks):
            ep = sampler.episode(i)
            xs, ys, xq = (model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels),
                          model.spec.normalize(data.images[ep.query]))
            p32 = ad32.adapt(xs, ys).classify(xq).argmax(1)
            p16 = ad16.adapt(xs, ys).classify(xq).argmax(1)
            same, total = same + int((p32 == p16).sum()), total + len(p32)
        return 100.0 * same / total
    net, adapter = model.net, model.adapter("support", device="cpu")
    s32, s16 = _session(fp32), _session(fp16)
    sampler = EpisodeSampler(data, net.ways, 1, 15, seed=0)
    same = total = 0
    for i in range(tasks):
        ep = sampler.episode(i)
        state = adapter.adapt(model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
        feeds = {k: v.numpy() for k, v in network_inputs(net, state.params, state.bn_stats, state.step).items()}
        feeds["images"] = model.spec.normalize(data.images[ep.query]).numpy()
        a, b = s32.run(None, feeds)[0].argmax(1), s16.run(None, feeds)[0].argmax(1)
        same, total = same + int((a == b).sum()), total + len(a)
    return 100.0 * same / total


def _meta_tensors(model) -> dict[str, torch.Tensor]:
    if isinstance(model, ShippedModel):
        out = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
        if model.center is not None:
            out["center"] = model.center
        return {k: v.detach().contiguous().float() for k, v in out.items()}
    out = {f"param.{k}": v for k, v in model.meta_params.items()}
    out |= {f"rule.{k}": v for k, v in model.rule.state_dict().items()}
    return {k: v.detach().contiguous() for k, v in out.items()}


def export_model(name: str, out_dir: Path = DEFAULT_BUNDLE_DIR, fp16: bool = False, triton_repo: Path | None = None,
                 log=print, triton_backend: str = "onnxruntime_onnx", triton_state_dir: Path | None = None) -> Path:
    """Export shipped model ``name`` into ``out_dir/<name>/``; returns the bundle folder. With
    ``triton_repo``, also write its Triton models there (:func:`fewshot.export.triton.write_bundle_models`:
    ``triton_backend`` ``onnxruntime_onnx`` or ``python``, tasks of ``fewshot_adapt`` in ``triton_state_dir``)."""
    model = load_model(name)
    name, spec = model.name, model.spec
    started = time.perf_counter()
    files: dict[str, bytes] = {}
    parity: dict[str, Any] = {"images": 256, "tolerance": FP32_TOLERANCE}
    if isinstance(model, ShippedModel):
        backbone, feature_dim = model.backbone, model.backbone.feature_dim
    else:
        from fewshot.models.backbones import Conv4

        # The meta network's body as a plain backbone: its features are what a metric head would use.
        backbone = Conv4(spec.channels, model.net.width, 4, spec.size)
        sd = {}
        for l in range(4):
            base = 4 * l
            sd[f"encoder.{base}.weight"] = model.meta_params[f"conv{l}.weight"]
            suffix = ".0" if model.net.per_step_bn else ""
            sd[f"encoder.{base + 1}.weight"] = model.meta_params[f"bn{l}.weight{suffix}"]
            sd[f"encoder.{base + 1}.bias"] = model.meta_params[f"bn{l}.bias{suffix}"]
            sd[f"encoder.{base + 1}.running_mean"] = torch.zeros(model.net.width)
            sd[f"encoder.{base + 1}.running_var"] = torch.ones(model.net.width)
        backbone.load_state_dict(sd, strict=False)
        backbone.eval()
        feature_dim = backbone.feature_dim
    images = _real_images(model)
    files["backbone.onnx"] = backbone_to_onnx(backbone, spec.channels, spec.size)
    parity["backbone_max_abs_diff"], parity["backbone_scale"] = _backbone_parity(backbone, files["backbone.onnx"], images)
    log(f"{name}: backbone.onnx fp32 parity on {len(images)} real images: max abs diff {parity['backbone_max_abs_diff']:.2e}"
        f" (outputs up to {parity['backbone_scale']:.3g})")
    _check_fp32(name, "backbone.onnx", parity["backbone_max_abs_diff"], parity["backbone_scale"])
    if isinstance(model, ShippedMetaModel):
        step = model.card["inner_loop"]["steps"]
        example = network_inputs(model.net, model.meta_params, [(torch.zeros(model.net.width), torch.ones(model.net.width))] * 4, step)
        files["network.onnx"] = network_to_onnx(model.net, example, step)
        parity["network_max_abs_diff"], parity["network_scale"] = _network_parity(model, files["network.onnx"])
        log(f"{name}: network.onnx fp32 parity (adapted weights of real tasks): max abs diff {parity['network_max_abs_diff']:.2e}"
            f" (logits up to {parity['network_scale']:.3g})")
        _check_fp32(name, "network.onnx", parity["network_max_abs_diff"], parity["network_scale"])
    if fp16:
        key = "network.onnx" if "network.onnx" in files else "backbone.onnx"
        half = {k: _to_fp16(v) for k, v in files.items()}
        parity["fp16_top1_agreement"] = _fp16_agreement(model, files[key], half[key])
        parity["fp16_tasks"] = 600
        log(f"{name}: fp16 top-1 agreement with fp32 on 600 real tasks: {parity['fp16_top1_agreement']:.2f}%")
        if parity["fp16_top1_agreement"] < FP16_MIN_AGREEMENT:
            raise ExportError(f"{name}: fp16 agrees with fp32 on {parity['fp16_top1_agreement']:.2f}% < {FP16_MIN_AGREEMENT}%")
        files = half
    bundle = out_dir / name
    bundle.mkdir(parents=True, exist_ok=True)
    for fname, blob in files.items():
        (bundle / fname).write_bytes(blob)
    save_file(_meta_tensors(model), str(bundle / "meta.safetensors"))
    manifest = build_manifest(model, feature_dim, sorted(files) + ["meta.safetensors"], bundle, parity, fp16)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if triton_repo is not None:
        from fewshot.export.registry import Bundle
        from fewshot.export.triton import write_bundle_models

        write_bundle_models(triton_repo, Bundle(bundle, manifest), triton_backend, triton_state_dir)
    log(f"{name}: bundle written to {bundle} ({time.perf_counter() - started:.1f} s)")
    return bundle


def build_manifest(model, feature_dim: int, file_names: list[str], bundle: Path, parity: dict, fp16: bool) -> dict[str, Any]:
    card = model.card
    meta = {"schema_version": SCHEMA_VERSION, "name": card["name"], "version": BUNDLE_VERSION,
            "family": card["family"], "method": card["method"], "architecture": card["architecture"],
            "input": card["input"], "feature_dim": feature_dim, "precision": "fp16" if fp16 else "fp32",
            "opset": ONNX_OPSET, "default_head": card["default_head"], "heads": card["heads"],
            "limits": card["limits"], "accuracy": card.get("accuracy", {}), "parity": parity, "data": card["data"],
            "training": {"command": card["training"]["command"], "seed": card["training"]["seed"]},
            "files": {f: {"sha256": sha256(bundle / f), "bytes": (bundle / f).stat().st_size} for f in file_names},
            "source": source_fingerprint(model.path)}
    if card["family"] == "metric":
        meta["heads"] = dict(card["heads"]) | {"centering_vector": {"file": "meta.safetensors", "tensor": "center"}}
    else:
        meta["inner_loop"] = card["inner_loop"]
        meta["network_inputs"] = ["images", *network_input_names_for(model)]
    return meta


def source_fingerprint(model_path: Path) -> dict[str, str]:
    """sha256 of the shipped model's weights, so a stale bundle can be detected after retraining."""
    return {"weights_sha256": sha256(model_path / "weights.safetensors")}


def bundle_is_current(bundle_dir: Path, model_path: Path) -> bool:
    """True when ``bundle_dir`` holds a manifest exported from the current weights of ``model_path``."""
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("source") == source_fingerprint(model_path)


def network_input_names_for(model: ShippedMetaModel) -> list[str]:
    from fewshot.export.onnx_graphs import network_input_names

    return network_input_names(model.net, model.card["inner_loop"]["steps"])
