"""Datasets: Omniglot, the committed Tiny ImageNet split, and image folders of any Pillow format."""

import numpy as np
import pytest
from PIL import Image

from fewshot.models.data import DatasetError, load_image_folder, load_omniglot, tinyimagenet_split
from fewshot.models.preprocess import InputSpec

pytestmark = pytest.mark.unit


def test_omniglot_splits_are_28x28_and_disjoint(omniglot_test):
    train, val = load_omniglot("train"), load_omniglot("val")
    for d in (train, val, omniglot_test):
        assert d.images.shape[1:] == (28, 28, 1) and d.images.dtype == np.uint8
        assert np.bincount(d.labels).min() == 20
    assert not set(train.class_names) & set(val.class_names)
    assert omniglot_test.num_classes == 659 and train.num_classes + val.num_classes == 964
    rot = load_omniglot("train", rotations=True)
    assert rot.num_classes == 4 * train.num_classes
    k = train.num_classes  # class k is class 0 rotated by 90 degrees
    assert np.array_equal(rot.images[rot.labels == k][0, ..., 0], np.rot90(train.images[train.labels == 0][0, ..., 0]))


def test_tinyimagenet_split_is_fixed_disjoint_and_covers_200_classes():
    split = tinyimagenet_split()
    sets = [set(split[k]) for k in ("train", "val", "test")]
    assert len(split["test"]) >= 40
    assert sum(map(len, sets)) == 200 and len(set.union(*sets)) == 200


def test_image_folder_reads_any_pillow_format(tmp_path, omniglot_test):
    spec = InputSpec.for_dataset("omniglot")
    for c, fmt in enumerate(("PNG", "JPEG", "WEBP")):
        folder = tmp_path / f"class{c}"
        folder.mkdir()
        for i in range(3):
            img = omniglot_test.images[omniglot_test.labels == c][i, ..., 0]
            Image.fromarray(img).resize((105, 105)).save(folder / f"{i}.{fmt.lower()}", fmt)
    data = load_image_folder(tmp_path, spec)
    assert data.images.shape == (9, 28, 28, 1)
    assert data.class_names == ["class0", "class1", "class2"]
    assert np.bincount(data.labels).tolist() == [3, 3, 3]


def test_image_folder_errors_name_the_problem(tmp_path):
    spec = InputSpec.for_dataset("omniglot")
    with pytest.raises(DatasetError, match="not found"):
        load_image_folder(tmp_path / "missing", spec)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DatasetError, match="has no images"):
        load_image_folder(tmp_path, spec)


def test_normalize_gives_the_torch_formulas_values_bit_for_bit(omniglot_test):
    """``InputSpec.normalize`` runs in numpy (no intra-op thread hand-off for small batches); its values
    are those of ``(x / 255 - mean) / std`` in torch float32, on which every shipped model was trained."""
    import torch

    from fewshot.models.preprocess import InputSpec

    rng = np.random.default_rng(0)
    for spec, images in (
        (InputSpec.for_dataset("omniglot"), omniglot_test.images[:500]),
        (InputSpec.for_dataset("tinyimagenet"), rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)),
    ):
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
        expected = (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
        got = spec.normalize(images)
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, expected)
        assert torch.equal(spec.normalize(torch.as_tensor(images)), expected)
