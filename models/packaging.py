"""Turning a training run into a shipped model, and choosing its head settings.

``package_run`` (supervised, metric family) picks the run's best checkpoint, computes the centering
vector on training classes and tunes every registered head on validation tasks
(:mod:`fewshot.models.tuning`); ``package_meta_run`` (meta-trained, inner-loop family) records the inner
loop's settings. ``tune_shipped`` re-tunes heads of an already shipped model (``fewshot tune``), e.g.
after a new head was added. Both end with :func:`calibrate_shipped` (also ``fewshot calibrate``): the
open-set calibration of every method at 1 and 5 shots on validation episodes with distractor classes,
written into the card's ``open_set`` block (and from there into every exported bundle's manifest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fewshot.errors import ConfigError
from fewshot.models.backbones import Conv4, ResNet12
from fewshot.models.card import CARD_SCHEMA, ModelCard
from fewshot.models.data import ImageSet, load_dataset
from fewshot.models.features import OnnxFeatures, backbone_to_onnx
from fewshot.models.metric_adapter import MetricFamily
from fewshot.models.preprocess import InputSpec
from fewshot.models.training import load_trained_backbone
from fewshot.models.tuning import TuningTasks, tune_heads
from fewshot.models.zoo import ZOO_DIR, ShippedModel, load_model

#: Classes per task of an inner-loop model with a prototype head (the metric models' maximum, 50).
MIN_WAYS, MAX_WAYS = 2, 50


def image_features(
    extract: Callable[[torch.Tensor], torch.Tensor], spec: InputSpec, chunk: int = 512
) -> Callable[[np.ndarray], torch.Tensor]:
    """``(n, H, W[, C])`` raw uint8 images -> ``(n, d)`` features by ``extract`` (normalised ``(b, C, H, W)``
    -> ``(b, d)``), normalised ``chunk`` at a time so that a large set never exists as float32 at once."""
    return lambda images: torch.cat([extract(spec.normalize(images[i : i + chunk])) for i in range(0, len(images), chunk)])


def _featurizer(backbone: Conv4 | ResNet12, spec: InputSpec) -> Callable[[np.ndarray], torch.Tensor]:
    """Raw images -> features of a trained backbone, in ONNX Runtime (about 8x faster than torch eager on CPU
    for the ~20k images involved)."""
    return image_features(OnnxFeatures(backbone_to_onnx(backbone, spec.channels, spec.size), backbone.feature_dim, "auto"), spec)


def _validation(
    features: Callable[[np.ndarray], torch.Tensor],
    dataset: str,
    data_root: str | None,
    center: torch.Tensor | None,
    tasks: int,
    seed: int,
    spec: InputSpec,
) -> TuningTasks:
    val: ImageSet = load_dataset(dataset, "val", data_root, spec=spec)
    return TuningTasks(features(val.images), val, center, tasks, seed)


def package_run(
    checkpoint: Path,
    name: str,
    command: str,
    out_dir: Path = ZOO_DIR,
    tune_tasks: int = 500,
    center_per_class: int = 100,
    calibration_tasks: int = 300,
) -> Path:
    """Turn a supervised training checkpoint into ``out_dir/name`` (weights + card)."""
    backbone, ck = load_trained_backbone(checkpoint)
    cfg = ck["config"]
    spec = InputSpec.from_dict(ck["spec"])
    features = _featurizer(backbone, spec)
    train = load_dataset(cfg["dataset"], "train", cfg.get("data_root"), rotations=cfg.get("rotations", False), spec=spec)
    rng = np.random.default_rng(cfg["seed"])
    idx = np.sort(np.concatenate([rng.choice(ix, min(center_per_class, len(ix)), replace=False) for ix in train.indices_by_class()]))
    center = features(train.images[idx]).mean(0)
    heads, validation = tune_heads(_validation(features, cfg["dataset"], cfg.get("data_root"), center, tune_tasks, cfg["seed"], spec))
    path = out_dir / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {**{f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, "center": center.contiguous()},
        str(path / "weights.safetensors"),
    )
    card = {
        "schema": CARD_SCHEMA,
        "name": name,
        "family": MetricFamily.family,
        "method": "direct-sum supervised pre-training",
        "architecture": backbone.config,
        "feature_dim": backbone.feature_dim,
        "input": spec.to_dict(),
        "training": {
            "command": command,
            "config": cfg,
            "dataset": cfg["dataset"],
            "seed": cfg["seed"],
            "train_classes": len(ck["classes"]),
            "steps": ck["step"],
            "best_val_accuracy": ck["best"],
        },
        "data": _data_record(cfg["dataset"]),
        "center": {"images_per_class": center_per_class, "split": "train", "seed": cfg["seed"]},
        "default_head": "centroid",
        "heads": heads,
        "head_tuning": validation,
        "limits": {"max_ways": 50, "max_shots": 50},
        "accuracy": {},
    }
    ModelCard.from_dict(card).save(path)
    calibrate_shipped(path, calibration_tasks, log=print)
    return path


def tune_shipped(name: str, heads: Iterable[str], tasks: int | None = None) -> dict[str, float]:
    """Choose the settings of ``heads`` for shipped metric model ``name`` on its validation tasks (the
    seed and task count its card recorded, unless ``tasks``) and write them into its card; returns the
    validation accuracies. The transform is chosen again by the same rule, so it stays the card's."""
    model = load_model(name)
    if not isinstance(model, ShippedModel):
        raise ConfigError(f"model {name} adapts with its inner loop; only metric models have heads to tune")
    card = model.card
    record = card.family_blocks.get("head_tuning", {})
    tasks = tasks or int(record.get("tasks", 500))
    seed = int(record.get("seed", card.training["seed"]))
    val = _validation(_featurizer(model.backbone, model.spec), card.dataset, None, model.center, tasks, seed, model.spec)
    block, new = tune_heads(val, list(heads))
    card.heads |= block
    card.family_blocks["head_tuning"] = {
        **record,
        "tasks": tasks,
        "seed": seed,
        "accuracy": {**record.get("accuracy", {}), **new["accuracy"]},
    }
    card.save(model.path)
    calibrate_shipped(model.path, methods=list(heads))  # the heads' logits changed: so does their calibration
    return new["accuracy"]


#: Open-set calibration: 5-way validation episodes, 15 known and 15 distractor queries per class.
CALIBRATION_WAYS, CALIBRATION_QUERIES, CALIBRATION_SHOTS, CALIBRATION_TASKS = 5, 15, (1, 5), 300


def _calibration_shape(val: ImageSet, way_range: tuple[int, int]) -> tuple[int, int]:
    """Ways and queries of the calibration episodes: :data:`CALIBRATION_WAYS` (within the model's ``way_range``)
    and :data:`CALIBRATION_QUERIES`, fewer on a small validation split (a user's folder): as many distractor
    classes as known ones, and every class must hold the largest shot count plus the queries. ``(0, 0)``: the
    split is too small to calibrate on."""
    smallest = min(len(ix) for ix in val.indices_by_class())
    queries = min(CALIBRATION_QUERIES, smallest - max(CALIBRATION_SHOTS))
    ways = max(way_range[0], min(CALIBRATION_WAYS, way_range[1], val.num_classes // 2))
    return (ways, queries) if queries >= 1 and 2 * ways <= val.num_classes else (0, 0)


def _data_record(dataset: str) -> dict[str, Any]:
    """The card's ``data`` block: the dataset and its split names; for ``folder:PATH`` also the class names of
    each split (the recorded seeded split, :func:`fewshot.models.folders.folder_split`)."""
    from fewshot.models.folders import folder_split, is_folder

    record: dict[str, Any] = {"dataset": dataset, "train_split": "train", "val_split": "val", "test_split": "test"}
    if is_folder(dataset):
        record["classes"] = folder_split(dataset)
    return record


def calibrate_shipped(
    name: str | Path,
    tasks: int = CALIBRATION_TASKS,
    seed: int | None = None,
    data_root: str | None = None,
    methods: Iterable[str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Calibrate every method (or ``methods``) of shipped model ``name`` at 1 and 5 shots on ``tasks``
    open-set validation episodes (:func:`fewshot.models.openset.calibrate`) and write the card's
    ``open_set`` block; returns it. Metric heads run on precomputed validation features (the backbone
    is batch-invariant, so this equals adapting on images); inner-loop models adapt on images, with
    the served BatchNorm mode. Seed: the card's training seed."""
    from fewshot.models.family import open_shipped

    shipped = load_model(name)
    card = shipped.card
    seed = int(card.training["seed"]) if seed is None else seed
    family = open_shipped(shipped)
    val: ImageSet = load_dataset(card.dataset, "val", data_root, spec=family.spec)
    block = calibrate_family(family, card.name, val, tasks, seed, methods, card.family_blocks.get("open_set", {}), log)
    if block:
        card.family_blocks["open_set"] = block
        card.save(shipped.path)
    return block


def calibrate_family(
    family: Any,
    name: str,
    val: ImageSet,
    tasks: int,
    seed: int,
    methods: Iterable[str] | None = None,
    previous: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The ``open_set`` block of a model's family object (a shipped model's or a bundle's) calibrated on
    the validation classes ``val`` (see :func:`calibrate_shipped`); ``{}`` when ``val`` is too small.
    ``previous``: the block so far (its other methods are kept)."""
    from fewshot.models.openset import calibrate

    ways, queries = _calibration_shape(val, family.way_range())
    if not ways:
        log(
            f"{name}: {val.num_classes} validation classes, or fewer than {max(CALIBRATION_SHOTS) + 1} images in one: "
            f"too few for open-set calibration (it needs twice the {max(2, family.way_range()[0])} ways of its tasks); "
            "the model's tasks answer with uncalibrated probabilities"
        )
        return {}
    inputs = family.calibration_inputs(val.images)
    block: dict[str, Any] = {
        "tasks": tasks,
        "seed": seed,
        "ways": ways,
        "queries": queries,
        "split": "val",
        "methods": dict((previous or {}).get("methods", {})),
    }
    for method in methods or family.methods:
        by_shots, records = {}, {}
        for shots in CALIBRATION_SHOTS:
            adapter = family.calibration_adapter(method, shots)
            cal, record = calibrate(adapter, val, inputs, ways, shots, queries, tasks, seed)
            by_shots[str(shots)], records[str(shots)] = cal.to_dict(), record
            log(f"{name} {method} {shots}-shot: T={cal.temperature:.4g}, score {cal.score}, {record}")
        block["methods"][method] = {"by_shots": by_shots, "validation": records}
    return block


def package_meta_run(checkpoint: Path, name: str, command: str, out_dir: Path = ZOO_DIR, calibration_tasks: int = 300) -> Path:
    """Turn a meta-training checkpoint into ``out_dir/name`` (weights + card)."""
    from fewshot.models.inner_loop.family import InnerLoopFamily

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    path = out_dir / name
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k.replace('__', '.')}": v.contiguous() for k, v in ck["meta"].items()}
    tensors |= {f"rule.{k}": v.contiguous() for k, v in ck["rule"].items()}
    save_file(tensors, str(path / "weights.safetensors"))
    method = cfg["method"]
    head_init = cfg.get("head_init", "learned")
    training = {
        "command": command,
        "config": cfg,
        "dataset": cfg["dataset"],
        "seed": cfg["seed"],
        "iterations": ck["iteration"],
        "best_val_accuracy": ck["best"],
        **({"averaged_iterations": ck["averaged_iterations"]} if "averaged_iterations" in ck else {}),
    }
    if cfg.get("init_from") and (out_dir / cfg["init_from"] / "card.json").exists():
        # fine-tuned from a shipped model (e.g. this one before a new head initialisation): keep its record
        training["initialised_from"] = ModelCard.load(out_dir / cfg["init_from"]).training
    # a prototype head adapts any number of classes (the card's range); a learned head its own rows only
    ways = {"min_ways": MIN_WAYS, "max_ways": MAX_WAYS} if head_init != "learned" else {"min_ways": cfg["ways"], "max_ways": cfg["ways"]}
    card = {
        "schema": CARD_SCHEMA,
        "name": name,
        "family": InnerLoopFamily.family,
        "method": method,
        "architecture": ck["net_config"],
        "input": ck["spec"],
        "feature_dim": None,
        "inner_loop": {
            "steps": cfg["inner_steps"],
            "max_steps": 4 * cfg["inner_steps"],
            "alpha": cfg["alpha"],
            "beta": cfg["beta"],
            "bn_mode": "support",
            # a network with frozen statistics (--init-backbone) never reads a batch's: one mode
            "bn_modes": ["support"] if ck["net_config"].get("frozen_bn") else ["support", "transductive"],
            "second_order_training": not (cfg["first_order"] or method == "fomaml"),
            "head_init": head_init,
            **({"head_alpha": cfg["head_alpha"]} if cfg.get("head_alpha") else {}),
        },
        "training": training,
        "data": _data_record(cfg["dataset"]),
        "default_head": method,
        "heads": {method: {}},
        "limits": {**ways, "max_shots": 50},
        "accuracy": {},
    }
    ModelCard.from_dict(card).save(path)
    calibrate_shipped(path, calibration_tasks, log=print)
    return path
