"""Few-shot image datasets: Omniglot (.npz), Tiny ImageNet-200 (.tar.gz) and image folders.

Every dataset is an :class:`ImageSet`: uint8 images ``(N, H, W, C)`` with integer labels ``(N,)``
and the class names. Decoded arrays live in a git-ignored cache (``FEWSHOT_CACHE``, default
``<repo>/.cache``) so the archives are decoded once.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fewshot.errors import ConfigError, FewShotError
from fewshot.models.preprocess import InputSpec, load_image

SPLITS_DIR = Path(__file__).resolve().parent / "splits"

OMNIGLOT_SIZE = 28
TINYIMAGENET_SIZE = 64
#: Omniglot alphabets of the background set held out for validation (lambda tuning, early stopping).
OMNIGLOT_VAL_ALPHABETS = 5


class DatasetError(FewShotError, ValueError):
    """Raised when a dataset cannot be found, decoded or split as asked."""


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit``, else ``$FEWSHOT_DATA``, else ``../shared/data`` from the working
    directory (a checkout beside ``shared/``, where ``make`` runs). Never derived from where the package
    is installed."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("FEWSHOT_DATA")
    if env:
        return Path(env)
    return Path("..") / "shared" / "data"


def cache_dir() -> Path:
    """Where decoded arrays are kept: ``$FEWSHOT_CACHE``, else ``.cache`` in the working directory."""
    path = Path(os.environ.get("FEWSHOT_CACHE", ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` (``.npy`` for one unnamed ``array``, else ``.npz``) through a temporary file
    of this process's own in the same folder, renamed into place: readers see the whole file or none, and
    several processes decoding the same dataset at once (parallel trainings) do not trip over each other."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npy":
                np.save(f, arrays["array"])
            else:
                np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy 2's stub reads **arrays as its allow_pickle flag (numpy 1 has none)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ImageSet:
    """Images of several classes.

    Attributes:
        images: uint8 ``(N, H, W, C)``.
        labels: int64 ``(N,)`` in ``[0, len(class_names))``.
        class_names: one name per class.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    _by_class: list[np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DatasetError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise DatasetError(f"{len(self.labels)} labels for {len(self.images)} images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices_by_class(self) -> list[np.ndarray]:
        """For each class, the indices of its images (ascending)."""
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            counts = np.bincount(self.labels, minlength=self.num_classes)
            self._by_class = np.split(order, np.cumsum(counts)[:-1])
        return self._by_class

    def subset(self, classes: list[int]) -> ImageSet:
        """The images of ``classes``, relabelled ``0..len(classes)-1`` in that order."""
        by_class = self.indices_by_class()
        idx = np.concatenate([by_class[c] for c in classes])
        labels = np.concatenate([np.full(len(by_class[c]), i, dtype=np.int64) for i, c in enumerate(classes)])
        return ImageSet(self.images[idx], labels, [self.class_names[c] for c in classes])


# ----------------------------------------------------------------------------- Omniglot
def _omniglot_array(root: Path, part: str) -> tuple[np.ndarray, list[str]]:
    """``(C, 20, 28, 28)`` uint8 (0 = ink, 255 = paper) and ``alphabet/character`` names of one part."""
    cached = cache_dir() / f"omniglot_{part}_{OMNIGLOT_SIZE}.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return z["images"], [str(n) for n in z["names"]]
    src = root / "omniglot" / f"omniglot_{part}_105.npz"
    if not src.exists():
        raise DatasetError(f"Omniglot file not found: {src} (set --data-root or FEWSHOT_DATA)")
    with np.load(src, allow_pickle=False) as z:
        raw, alphabets, characters = z["images"], z["alphabet"], z["character"]
    spec = InputSpec.for_dataset("omniglot")
    small = np.stack([np.stack([spec.prepare(Image.fromarray(img)) for img in drawings]) for drawings in raw])
    names = [f"{a}/{c}" for a, c in zip(alphabets, characters)]
    atomic_save(cached, images=small, names=np.array(names))
    return small, names


def load_omniglot(split: str, root: str | os.PathLike | None = None, rotations: bool = False) -> ImageSet:
    """Omniglot at 28x28, one channel.

    Splits: ``train`` = background minus its last ``OMNIGLOT_VAL_ALPHABETS`` alphabets, ``val`` = those
    alphabets, ``test`` = the evaluation set. ``rotations`` adds the 90/180/270 degree rotations of
    every class as extra classes (training only).
    """
    base = data_root(root)
    if split in ("train", "val"):
        images, names = _omniglot_array(base, "background")
        alphabets = sorted({n.split("/")[0] for n in names})
        held = set(alphabets[-OMNIGLOT_VAL_ALPHABETS:])
        keep = [i for i, n in enumerate(names) if (n.split("/")[0] in held) == (split == "val")]
        images, names = images[keep], [names[i] for i in keep]
    elif split == "test":
        images, names = _omniglot_array(base, "evaluation")
    else:
        raise DatasetError(f"unknown Omniglot split {split!r}: use train, val or test")
    if rotations:
        images = np.concatenate([np.rot90(images, k, axes=(2, 3)) for k in range(4)])
        names = [f"{n}@rot{90 * k}" for k in range(4) for n in names]
    c, m = images.shape[:2]
    flat = np.ascontiguousarray(images.reshape(c * m, OMNIGLOT_SIZE, OMNIGLOT_SIZE, 1))
    return ImageSet(flat, np.repeat(np.arange(c, dtype=np.int64), m), names)


# ----------------------------------------------------------------------------- Tiny ImageNet
def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of a regular file ``member`` of ``tar``."""
    data = tar.extractfile(member)
    assert data is not None  # extractfile gives None only for members that are not regular files
    return data.read()


def _tinyimagenet_arrays(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All 200 x 550 images (train + val folders) as uint8 ``(N, 64, 64, 3)``, labels, sorted wnids."""
    cdir = cache_dir()
    img_path, lab_path, wnid_path = (cdir / f"tinyimagenet_{k}" for k in ("images.npy", "labels.npy", "wnids.json"))
    if img_path.exists() and lab_path.exists() and wnid_path.exists():
        return np.load(img_path, mmap_mode="r"), np.load(lab_path), json.loads(wnid_path.read_text())
    src = root / "tiny-imagenet" / "tiny-imagenet-200_train_val.tar.gz"
    if not src.exists():
        raise DatasetError(f"Tiny ImageNet archive not found: {src} (set --data-root or FEWSHOT_DATA)")
    files: dict[str, bytes] = {}
    val_annotations = ""
    with tarfile.open(src, "r:gz") as tar:
        for member in tqdm(tar, desc="read Tiny ImageNet archive", unit="file", mininterval=2):
            if not member.isfile():
                continue
            name = member.name
            if name.endswith(".JPEG"):
                files[name] = _read_member(tar, member)
            elif name.endswith("val/val_annotations.txt"):
                val_annotations = _read_member(tar, member).decode()
    val_label = {line.split("\t")[0]: line.split("\t")[1] for line in val_annotations.splitlines() if line}
    items: list[tuple[str, str]] = []  # (wnid, path)
    for name in files:
        parts = name.split("/")
        if "/train/" in name:
            items.append((parts[-3], name))
        elif "/val/" in name:
            items.append((val_label[parts[-1]], name))
    wnids = sorted({w for w, _ in items})
    # Order: by class, then train images before val images, each by file name: fixed and reproducible.
    items.sort(key=lambda t: (t[0], "/val/" in t[1], t[1]))
    images = np.empty((len(items), TINYIMAGENET_SIZE, TINYIMAGENET_SIZE, 3), dtype=np.uint8)
    for i, (_, name) in enumerate(tqdm(items, desc="decode Tiny ImageNet (once, into the cache)", unit="img", mininterval=2)):
        images[i] = load_image(io.BytesIO(files[name]), InputSpec.for_dataset("tinyimagenet"))
    index = {w: i for i, w in enumerate(wnids)}
    labels = np.array([index[w] for w, _ in items], dtype=np.int64)
    atomic_save(img_path, array=images)
    atomic_save(lab_path, array=labels)
    wnid_path.write_text(json.dumps(wnids))
    return np.load(img_path, mmap_mode="r"), labels, wnids


def tinyimagenet_split() -> dict[str, list[str]]:
    """The committed class split: ``{"train": [...], "val": [...], "test": [...]}`` of wnids."""
    return json.loads((SPLITS_DIR / "tinyimagenet.json").read_text())


def load_tinyimagenet(split: str, root: str | os.PathLike | None = None) -> ImageSet:
    """Tiny ImageNet-200 at 64x64 RGB, restricted to the classes of ``split`` (train/val/test)."""
    splits = tinyimagenet_split()
    if split not in splits:
        raise DatasetError(f"unknown Tiny ImageNet split {split!r}: use {', '.join(splits)}")
    images, labels, wnids = _tinyimagenet_arrays(data_root(root))
    index = {w: i for i, w in enumerate(wnids)}
    classes = [index[w] for w in splits[split]]
    mask = np.isin(labels, classes)
    remap = np.full(len(wnids), -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    return ImageSet(np.ascontiguousarray(images[mask]), remap[labels[mask]], list(splits[split]))


# ----------------------------------------------------------------------------- image folders
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: ``folder:PATH`` names the user's image folder as a dataset (:mod:`fewshot.models.folders`).
FOLDER_PREFIX = "folder:"
#: The built-in datasets (besides ``folder:PATH``).
DATASETS = ("omniglot", "tinyimagenet")


def is_folder(dataset: str) -> bool:
    """Whether ``dataset`` names an image folder (``folder:PATH``)."""
    return dataset.startswith(FOLDER_PREFIX)


def image_files(folder: Path) -> list[Path]:
    """The image files (by :data:`IMAGE_SUFFIXES`) directly in ``folder``, sorted; hidden files skipped."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` (one class each), sorted; hidden ones skipped."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def decode_file(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file at ``spec``; a file Pillow cannot decode is a :class:`DatasetError` naming it."""
    try:
        return load_image(path, spec)
    except FewShotError as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def load_image_folder(path: str | os.PathLike, spec: InputSpec) -> ImageSet:
    """A class-per-subfolder tree of images (any Pillow-readable format), preprocessed by ``spec``."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = class_folders(root)
    if len(classes) < 2:
        raise DatasetError(f"{root} needs at least two class subfolders, found {len(classes)}")
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = image_files(folder)
        if not files:
            raise DatasetError(f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            images.append(decode_file(f, spec))
            labels.append(label)
    return ImageSet(np.stack(images), np.array(labels, dtype=np.int64), [c.name for c in classes])


def load_dataset(
    name: str, split: str, root: str | os.PathLike | None = None, rotations: bool = False, spec: InputSpec | None = None
) -> ImageSet:
    """``omniglot``, ``tinyimagenet`` or ``folder:PATH`` (:mod:`fewshot.models.folders`) by split. A folder is
    decoded at ``spec``'s size and channels (the model's input spec), which it therefore needs."""
    if is_folder(name):
        from fewshot.models.folders import load_folder

        if rotations:
            raise DatasetError("--rotations applies to Omniglot only")
        if spec is None:
            raise DatasetError(f"{name}: a folder dataset is decoded at a model's input size; give its input spec")
        return load_folder(name, split, spec)
    if name == "omniglot":
        return load_omniglot(split, root, rotations=rotations)
    if name == "tinyimagenet":
        if rotations:
            raise DatasetError("--rotations applies to Omniglot only")
        return load_tinyimagenet(split, root)
    raise DatasetError(f"unknown dataset {name!r}: use omniglot, tinyimagenet or folder:PATH")


def dataset_spec(name: str, image_size: int = 0, channels: int = 0) -> InputSpec:
    """The input spec a model trained on dataset ``name`` takes: the built-in datasets' own (``image_size``
    and ``channels`` must then be 0 or theirs), or for ``folder:PATH`` the requested size and channels with
    the training classes' statistics (:func:`fewshot.models.folders.folder_spec`)."""
    check_dataset(name)
    if is_folder(name):
        from fewshot.models.folders import folder_spec

        return folder_spec(name, image_size, channels)
    spec = InputSpec.for_dataset(name)
    if image_size not in (0, spec.size) or channels not in (0, spec.channels):
        raise ConfigError(
            f"{name} images are {spec.size}x{spec.size} with {spec.channels} channel(s): "
            "--image-size and --channels apply to folder:PATH datasets"
        )
    return spec


def check_dataset(name: str) -> None:
    """A :class:`~fewshot.errors.ConfigError` unless ``name`` is a built-in dataset or ``folder:PATH``."""
    if name not in DATASETS and not is_folder(name):
        raise ConfigError(f"unknown --dataset {name!r}: use omniglot, tinyimagenet or folder:PATH")
