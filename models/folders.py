"""The user's own images as a dataset: ``folder:PATH``.

``PATH`` holds one subfolder per class (any images Pillow reads: JPEG, PNG, WebP, ...), or three folders
``PATH/train``, ``PATH/val``, ``PATH/test`` that each hold class subfolders (the user's own split). Without
them the classes are split into train/val/test by a seeded permutation of their sorted names
(:data:`SPLIT_SEED`, :data:`SPLIT_FRACTIONS`): the same folder always gives the same split, and the
model card records it (``data.classes``).

Images are decoded once, at the model's input size and channels, into the cache (``$FEWSHOT_CACHE``, as
Tiny ImageNet): ``(N, size, size, channels)`` uint8, keyed by the files' names, sizes and modification
times, so an edited folder is decoded again. Non-image files (by extension) are ignored; an image Pillow
cannot decode is an error that names the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot.errors import ConfigError
from fewshot.models.data import (
    FOLDER_PREFIX,
    IMAGE_SUFFIXES,
    DatasetError,
    ImageSet,
    atomic_save,
    cache_dir,
    class_folders,
    decode_file,
    image_files,
    is_folder,
)
from fewshot.models.preprocess import InputSpec

SPLITS = ("train", "val", "test")
#: The seeded split of a folder without ``train/val/test``: 60% / 20% / 20% of the classes (at least
#: :data:`MIN_SPLIT_CLASSES` each), permuted by ``numpy.random.default_rng(SPLIT_SEED)``.
SPLIT_FRACTIONS, SPLIT_SEED, MIN_SPLIT_CLASSES = (0.6, 0.2, 0.2), 0, 2
#: Input size and channels of a folder model when ``--image-size`` / ``--channels`` are not given.
DEFAULT_SIZE, DEFAULT_CHANNELS = 84, 3


def folder_root(dataset: str) -> Path:
    """The folder of ``folder:PATH``, checked to exist."""
    root = Path(dataset[len(FOLDER_PREFIX) :]).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root} (folder:PATH needs a folder with one subfolder per class)")
    return root


def canonical(dataset: str) -> str:
    """``folder:ABSOLUTE_PATH`` (what training records, so that package, export and eval find it from any
    working directory); built-in names unchanged."""
    return FOLDER_PREFIX + str(folder_root(dataset).resolve()) if is_folder(dataset) else dataset


def folder_split(dataset: str) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` class names (subfolder names) of ``folder:PATH``."""
    root = folder_root(dataset)
    if all((root / s).is_dir() for s in SPLITS):
        split = {s: [p.name for p in class_folders(root / s) if image_files(p)] for s in SPLITS}
    else:
        names = [p.name for p in class_folders(root) if image_files(p)]
        n = len(names)
        n_val, n_test = (max(MIN_SPLIT_CLASSES, round(f * n)) for f in SPLIT_FRACTIONS[1:])
        if n - n_val - n_test < MIN_SPLIT_CLASSES:
            raise DatasetError(
                f"{root} has {n} class subfolders with images; a seeded train/val/test split needs at "
                f"least {3 * MIN_SPLIT_CLASSES} (or split them yourself into {root}/train, val and test)"
            )
        order = [names[i] for i in np.random.default_rng(SPLIT_SEED).permutation(n)]
        split = {"train": sorted(order[n_val + n_test :]), "val": sorted(order[:n_val]), "test": sorted(order[n_val : n_val + n_test])}
    for s, classes in split.items():
        if len(classes) < MIN_SPLIT_CLASSES:
            raise DatasetError(f"split {s} of {root} has {len(classes)} classes with images; it needs at least {MIN_SPLIT_CLASSES}")
    return split


def _split_folders(root: Path, split: str, classes: list[str]) -> list[Path]:
    base = root / split if all((root / s).is_dir() for s in SPLITS) else root
    return [base / c for c in classes]


def load_folder(dataset: str, split: str, spec: InputSpec, progress: bool = True) -> ImageSet:
    """The ``split`` classes of ``folder:PATH`` decoded at ``spec``'s size and channels (cached)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    root = folder_root(dataset)
    classes = folder_split(dataset)[split]
    return _decode(root, split, classes, _split_folders(root, split, classes), spec, progress)


def _decode(root: Path, tag: str, classes: list[str], dirs: list[Path], spec: InputSpec, progress: bool) -> ImageSet:
    files = [(i, f) for i, d in enumerate(dirs) for f in image_files(d)]
    key = hashlib.sha256(
        json.dumps(
            [
                str(root.resolve()),
                tag,
                spec.size,
                spec.channels,
                spec.resize,
                classes,
                [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for _, f in files],
            ]
        ).encode()
    ).hexdigest()[:16]
    cached = cache_dir() / f"folder_{root.name}_{tag}_{key}.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return ImageSet(z["images"], z["labels"], [str(c) for c in z["names"]])
    images = np.empty((len(files), spec.size, spec.size, spec.channels), dtype=np.uint8)
    for j, (_, f) in enumerate(
        tqdm(files, desc=f"decode {root.name}/{tag}", unit="img", mininterval=2, disable=not progress or len(files) < 500)
    ):
        images[j] = decode_file(f, spec)
    labels = np.array([i for i, _ in files], dtype=np.int64)
    atomic_save(cached, images=images, labels=labels, names=np.array(classes))
    return ImageSet(images, labels, classes)


def sample_files(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files anywhere under ``folder`` (sorted; an even spread when there are more)."""
    root = folder_root(f"{FOLDER_PREFIX}{folder}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images under {root} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files if len(files) <= limit else [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]


def folder_spec(dataset: str, image_size: int = 0, channels: int = 0) -> InputSpec:
    """The input spec of a model trained on ``folder:PATH``: ``image_size`` x ``image_size`` (default
    :data:`DEFAULT_SIZE`), ``channels`` 1 or 3 (default 3), and per-channel mean and standard deviation of
    the training classes' decoded images (in [0, 1], as the built-in datasets' specs)."""
    channels, size = channels or DEFAULT_CHANNELS, image_size or DEFAULT_SIZE
    if channels not in (1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {channels}")
    if not 16 <= size <= 512:
        raise ConfigError(f"--image-size must be within 16..512, got {size}")
    provisional = InputSpec(channels, size, (0.5,) * channels, (0.25,) * channels)
    train = load_folder(dataset, "train", provisional)
    pixels = train.images.reshape(-1, channels).astype(np.float64) / 255.0
    mean, std = pixels.mean(0), pixels.std(0)
    return InputSpec(channels, size, tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1e-3), 4) for s in std))


__all__ = ["FOLDER_PREFIX", "canonical", "folder_root", "folder_spec", "folder_split", "is_folder", "load_folder", "sample_files"]
