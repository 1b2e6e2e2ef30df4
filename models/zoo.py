"""Shipped models: ``models/zoo/<name>/`` holds ``weights.safetensors`` (backbone state and, for
the metric family, the centering vector) and ``card.json`` (architecture, input spec, feature dim,
training command, data, seed, head settings and measured accuracy).

``package_run`` turns a training run into a shipped model: it picks the best checkpoint, computes
the centering vector on the training classes and chooses the head settings (feature transform,
LaplacianShot's lambda per shot count) on validation tasks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fewshot.errors import ConfigError
from fewshot.models.backbones import build_backbone
from fewshot.models.data import load_dataset
from fewshot.models.evaluation import evaluate_features
from fewshot.models.features import FeatureExtractor, OnnxFeatures, TorchFeatures, backbone_to_onnx
from fewshot.models.heads.base import FewShotHead
from fewshot.models.heads.centroid import CentroidHead
from fewshot.models.heads.laplacian_shot import LaplacianShotHead
from fewshot.models.heads.transforms import TRANSFORMS
from fewshot.models.preprocess import InputSpec
from fewshot.models.training import load_trained_backbone
from fewshot.models.runtime import torch_device

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
CARD_SCHEMA = 1
#: LaplacianShot's lambda grid: the authors' grid (shared/METHODS.md) extended downwards, since on
#: Conv-4 CL2N features the small values win on validation.
LAMBDA_GRID = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)
HEADS = ("centroid", "laplacianshot")


class ModelNotFoundError(ConfigError):
    """Raised when a model name or folder does not hold a model card and weights."""


@dataclass
class ShippedModel:
    """A loaded model: its card, backbone (eval mode) and centering vector."""

    name: str
    card: dict[str, Any]
    backbone: torch.nn.Module
    center: torch.Tensor | None
    path: Path

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.card["input"])

    def extractor(self, backend: str = "onnxruntime", device: str = "auto") -> FeatureExtractor:
        """The backbone as a feature extractor, in ONNX Runtime (default) or torch."""
        if backend == "torch":
            return TorchFeatures(self.backbone, str(torch_device(device)))
        if backend == "onnxruntime":
            spec = self.spec
            return OnnxFeatures(backbone_to_onnx(self.backbone, spec.channels, spec.size), self.backbone.feature_dim, device)
        raise ConfigError(f"unknown feature backend {backend!r}: use onnxruntime or torch")

    def head(self, name: str | None = None, shots: int = 1, **overrides: Any) -> FewShotHead:
        """A head configured from the card (``overrides``: transform, lam, knn, rectify)."""
        return build_head(self.card["heads"], name or self.card["default_head"], shots, self.center, self.name, **overrides)


def build_head(heads: dict[str, Any], name: str, shots: int, center: torch.Tensor | None, model: str = "this model",
               **overrides: Any) -> FewShotHead:
    """A metric head from a card's (or manifest's) ``heads`` block; ``overrides`` (transform, lam, knn,
    rectify) that are ``None`` keep the stored settings. LaplacianShot's lambda is the one tuned for
    the nearest tuned shot count."""
    if name not in heads or name not in HEADS:
        offered = [h for h in heads if h in HEADS]
        raise ConfigError(f"model {model} has no head {name!r}: it offers {', '.join(offered)}")
    cfg = dict(heads[name])
    transform = overrides.get("transform") or cfg["transform"]
    if name == "centroid":
        return CentroidHead(transform, center)
    lam = overrides.get("lam")
    if lam is None:
        lam_by_shot = cfg["lambda"]
        lam = lam_by_shot[min(lam_by_shot, key=lambda k: abs(int(k) - shots))]
    rectify = cfg["rectify"] if overrides.get("rectify") is None else overrides["rectify"]
    return LaplacianShotHead(lam=float(lam), knn=int(overrides.get("knn") or cfg["knn"]), transform=transform,
                             center=center, rectify=bool(rectify))


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """A zoo name (``omniglot-conv4-directsum``) or a folder holding ``card.json``."""
    path = Path(name_or_path)
    if (path / "card.json").exists():
        return path
    if (ZOO_DIR / str(name_or_path) / "card.json").exists():
        return ZOO_DIR / str(name_or_path)
    names = sorted(p.name for p in ZOO_DIR.iterdir() if (p / "card.json").exists()) if ZOO_DIR.exists() else []
    raise ModelNotFoundError(f"unknown model {name_or_path!r}: shipped models are {', '.join(names) or 'none'}")


def load_model(name_or_path: str | os.PathLike) -> "ShippedModel | ShippedMetaModel":
    """Load a shipped model (either family) by zoo name or folder."""
    path = model_dir(name_or_path)
    card = json.loads((path / "card.json").read_text())
    if card.get("family") == "inner_loop":
        return load_meta_model(path, card)
    tensors = load_file(str(path / "weights.safetensors"))
    center = tensors.pop("center", None)
    backbone = build_backbone(card["architecture"])
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()})
    return ShippedModel(card["name"], card, backbone.eval(), center, path)


@dataclass
class ShippedMetaModel:
    """A loaded gradient-adapted model: meta-learned initial weights and update rule."""

    name: str
    card: dict[str, Any]
    net: Any
    rule: torch.nn.Module
    meta_params: dict[str, torch.Tensor]
    path: Path

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.card["input"])

    def adapter(self, bn_mode: str | None = None, steps: int | None = None, device: str = "auto"):
        """The model's inner loop as an adapter (``support`` BatchNorm unless asked otherwise)."""
        dev = torch_device(device)
        params = {k: v.to(dev) for k, v in self.meta_params.items()}
        return inner_loop_adapter(self.name, self.card["inner_loop"], self.net, self.rule.to(dev), params, steps, bn_mode)


def accuracy_key(ways: int, shots: int, head: str, bn: str | None = None) -> str:
    """Key of a measured accuracy in a card's ``accuracy`` (written by scripts/results.py), e.g.
    ``5way_1shot_centroid`` or, for inner-loop models, ``5way_1shot_cxgrad_support``."""
    return f"{ways}way_{shots}shot_{head}" + (f"_{bn}" if bn else "")


def shipped_models(zoo: Path = ZOO_DIR) -> list[str]:
    """Names of the shipped models (folders of ``zoo`` with a ``card.json``), sorted."""
    return sorted(p.name for p in zoo.iterdir() if (p / "card.json").exists())


def meta_model_parts(method: str, architecture: dict[str, Any], loop: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> tuple[Any, torch.nn.Module, dict[str, torch.Tensor]]:
    """Network, update rule (eval mode) and meta-parameters of a gradient model, from its card's (or
    bundle manifest's) ``method``, ``architecture`` and ``inner_loop`` and its ``param.*``/``rule.*`` tensors."""
    from fewshot.models.meta.network import MetaConv4
    from fewshot.models.meta.rules import build_rule

    net = MetaConv4(**{k: v for k, v in architecture.items() if k != "arch"})
    rule = build_rule(method, net, loop["steps"], loop["alpha"], loop.get("beta", 1.0))
    rule.load_state_dict({k.removeprefix("rule."): v for k, v in tensors.items() if k.startswith("rule.")})
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    return net, rule.eval(), params


def inner_loop_adapter(name: str, loop: dict[str, Any], net: Any, rule: torch.nn.Module,
                       params: dict[str, torch.Tensor], steps: int | None = None, bn_mode: str | None = None):
    """``InnerLoopAdapter`` with the card's defaults; ``steps`` must lie in ``1..loop["max_steps"]``."""
    from fewshot.models.meta.inner_loop import InnerLoopAdapter

    steps = loop["steps"] if steps is None else steps
    if not 1 <= steps <= loop["max_steps"]:
        raise ConfigError(f"inner steps must be in 1..{loop['max_steps']} for {name}, got {steps}")
    return InnerLoopAdapter(net, rule, params, steps, bn_mode or loop["bn_mode"])


def load_meta_model(path: Path, card: dict[str, Any]) -> ShippedMetaModel:
    net, rule, params = meta_model_parts(card["method"], card["architecture"], card["inner_loop"],
                                         load_file(str(path / "weights.safetensors")))
    return ShippedMetaModel(card["name"], card, net, rule, params, path)


def package_meta_run(checkpoint: Path, name: str, command: str, out_dir: Path = ZOO_DIR) -> Path:
    """Turn a meta-training checkpoint into ``out_dir/name`` (weights + card)."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    path = out_dir / name
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k.replace('__', '.')}": v.contiguous() for k, v in ck["meta"].items()}
    tensors |= {f"rule.{k}": v.contiguous() for k, v in ck["rule"].items()}
    save_file(tensors, str(path / "weights.safetensors"))
    method = cfg["method"]
    card = {
        "schema": CARD_SCHEMA, "name": name, "family": "inner_loop", "method": method,
        "architecture": ck["net_config"], "input": ck["spec"], "feature_dim": None,
        "inner_loop": {"steps": cfg["inner_steps"], "max_steps": 4 * cfg["inner_steps"], "alpha": cfg["alpha"],
                       "beta": cfg["beta"], "bn_mode": "support", "bn_modes": ["support", "transductive"],
                       "second_order_training": not (cfg["first_order"] or method == "fomaml")},
        "training": {"command": command, "config": cfg, "dataset": cfg["dataset"], "seed": cfg["seed"],
                     "iterations": ck["iteration"], "best_val_accuracy": ck["best"],
                     **({"averaged_iterations": ck["averaged_iterations"]} if "averaged_iterations" in ck else {})},
        "data": {"dataset": cfg["dataset"], "train_split": "train", "val_split": "val", "test_split": "test"},
        "default_head": method, "heads": {method: {}},
        "limits": {"min_ways": cfg["ways"], "max_ways": cfg["ways"], "max_shots": 50}, "accuracy": {},
    }
    save_card(path, card)
    return path


def save_card(path: Path, card: dict[str, Any]) -> None:
    (path / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def _tune_heads(feats: torch.Tensor, val, center: torch.Tensor, tasks: int, seed: int) -> dict[str, Any]:
    """Choose the centroid transform and LaplacianShot's (transform, lambda, rectify) per shot on
    ``tasks`` validation tasks (5-way, 15 queries)."""
    chosen: dict[str, Any] = {"centroid": {}, "laplacianshot": {"knn": 3, "lambda": {}}}
    scores: dict[str, Any] = {}
    best_t = max(TRANSFORMS, key=lambda t: evaluate_features(feats, val, CentroidHead(t, center), 5, 1, 15, tasks, seed).accuracy)
    chosen["centroid"]["transform"] = best_t
    lap_scores: dict[tuple, float] = {}
    for shots in (1, 5):
        for lam, rect in product(LAMBDA_GRID, (False, True)):
            head = LaplacianShotHead(lam, 3, best_t, center, rect)
            lap_scores[(shots, lam, rect)] = evaluate_features(feats, val, head, 5, shots, 15, tasks, seed).accuracy
    rect = max((False, True), key=lambda r: sum(v for (s, l, rr), v in lap_scores.items() if rr == r))
    for shots in (1, 5):
        lam = max(LAMBDA_GRID, key=lambda l: lap_scores[(shots, l, rect)])
        chosen["laplacianshot"]["lambda"][str(shots)] = lam
        scores[f"laplacianshot_{shots}shot"] = lap_scores[(shots, lam, rect)]
    chosen["laplacianshot"] |= {"transform": best_t, "rectify": rect}
    chosen["validation"] = {"tasks": tasks, "seed": seed, "ways": 5, "queries": 15, "accuracy": scores,
                            "lambda_grid": list(LAMBDA_GRID)}
    return chosen


def package_run(checkpoint: Path, name: str, command: str, out_dir: Path = ZOO_DIR, tune_tasks: int = 500,
                center_per_class: int = 100) -> Path:
    """Turn a training checkpoint into ``out_dir/name`` (weights + card)."""
    backbone, ck = load_trained_backbone(checkpoint)
    cfg = ck["config"]
    spec = InputSpec.from_dict(ck["spec"])
    train = load_dataset(cfg["dataset"], "train", cfg.get("data_root"), rotations=cfg.get("rotations", False))
    rng = np.random.default_rng(cfg["seed"])
    idx = np.sort(np.concatenate([rng.choice(ix, min(center_per_class, len(ix)), replace=False) for ix in train.indices_by_class()]))
    # ONNX Runtime: about 8x faster than torch eager on CPU for the ~20k images involved.
    extract = OnnxFeatures(backbone_to_onnx(backbone, spec.channels, spec.size), backbone.feature_dim, "auto")

    def features(images: np.ndarray) -> torch.Tensor:
        return torch.cat([extract(spec.normalize(images[i:i + 512])) for i in range(0, len(images), 512)])

    center = features(train.images[idx]).mean(0)
    val = load_dataset(cfg["dataset"], "val", cfg.get("data_root"))
    feats = features(val.images)
    heads = _tune_heads(feats, val, center, tune_tasks, seed=cfg["seed"])
    validation = heads.pop("validation")
    path = out_dir / name
    path.mkdir(parents=True, exist_ok=True)
    save_file({**{f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, "center": center.contiguous()},
              str(path / "weights.safetensors"))
    card = {
        "schema": CARD_SCHEMA, "name": name, "family": "metric", "method": "direct-sum supervised pre-training",
        "architecture": backbone.config, "feature_dim": backbone.feature_dim, "input": spec.to_dict(),
        "training": {"command": command, "config": cfg, "dataset": cfg["dataset"], "seed": cfg["seed"],
                     "train_classes": len(ck["classes"]), "steps": ck["step"], "best_val_accuracy": ck["best"]},
        "data": {"dataset": cfg["dataset"], "train_split": "train", "val_split": "val", "test_split": "test"},
        "center": {"images_per_class": center_per_class, "split": "train", "seed": cfg["seed"]},
        "default_head": "centroid", "heads": heads, "head_tuning": validation,
        "limits": {"max_ways": 50, "max_shots": 50}, "accuracy": {},
    }
    save_card(path, card)
    return path
