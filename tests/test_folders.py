"""The user's own images (issue 18, part 1): ``--dataset folder:PATH``.

Unit tier: the seeded, recorded class split (or the user's own ``train/val/test``), non-image files ignored,
an unreadable image named in the error, the decode cache. End to end: 30 Tiny ImageNet test classes written
as JPEG files; the "Use your own images" block of docs/training.md trains a direct-sum backbone and a MAML learner on
them (a few hundred steps, small budgets substituted), packages, evaluates and exports them; a real server
serves both bundles, and the SDK's answers on the folder's own files equal the bundles' family objects in
process on the decoded test split.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import SMALL

from fewshot.errors import ConfigError
from fewshot.models.data import DatasetError, dataset_spec, load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.folders import folder_split, load_folder
from fewshot.models.preprocess import InputSpec

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = 30, 40


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 Tiny ImageNet test classes, 40 JPEG files each, one subfolder per class, plus a stray text file."""
    tiny = load_dataset("tinyimagenet", "test")
    root = tmp_path_factory.mktemp("folder") / "my-photos"
    for c, ix in enumerate(tiny.indices_by_class()[:CLASSES]):
        (root / tiny.class_names[c]).mkdir(parents=True)
        for j, i in enumerate(ix[:PER_CLASS]):
            Image.fromarray(tiny.images[i]).save(root / tiny.class_names[c] / f"{j:03d}.jpg", quality=90)
    (root / tiny.class_names[0] / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("not a class")
    return root


SMALL_SPEC = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.unit
def test_the_seeded_split_covers_every_class_once_and_is_stable(photos):
    split = folder_split(f"folder:{photos}")
    assert [len(split[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    every = split["train"] + split["val"] + split["test"]
    assert sorted(every) == sorted(p.name for p in photos.iterdir() if p.is_dir())
    assert folder_split(f"folder:{photos}") == split  # seeded: the same folder, the same split


@pytest.mark.unit
def test_a_users_own_split_is_kept(photos, tmp_path):
    names = sorted(p.name for p in photos.iterdir() if p.is_dir())
    for s, chosen in (("train", names[:4]), ("val", names[4:6]), ("test", names[6:9])):
        for n in chosen:
            shutil.copytree(photos / n, tmp_path / s / n)
    assert folder_split(f"folder:{tmp_path}") == {"train": names[:4], "val": names[4:6], "test": names[6:9]}
    data = load_folder(f"folder:{tmp_path}", "test", SMALL_SPEC, progress=False)
    assert data.class_names == names[6:9] and np.bincount(data.labels).tolist() == [PER_CLASS] * 3


@pytest.mark.unit
def test_images_decode_once_at_the_models_size_non_images_ignored(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path))
    data = load_folder(f"folder:{photos}", "val", SMALL_SPEC, progress=False)
    assert data.images.shape == (6 * PER_CLASS, 32, 32, 3) and data.images.dtype == np.uint8
    cached = list(tmp_path.glob("folder_*.npz"))
    assert len(cached) == 1
    again = load_folder(f"folder:{photos}", "val", SMALL_SPEC, progress=False)
    assert np.array_equal(again.images, data.images) and list(tmp_path.glob("folder_*.npz")) == cached
    gray = load_folder(f"folder:{photos}", "val", InputSpec(1, 28, (0.5,), (0.25,)), progress=False)
    assert gray.images.shape == (6 * PER_CLASS, 28, 28, 1)


@pytest.mark.unit
def test_bad_folders_get_errors_a_user_can_act_on(photos, tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        folder_split(f"folder:{tmp_path / 'missing'}")
    for c in range(5):
        shutil.copytree(photos / sorted(p.name for p in photos.iterdir() if p.is_dir())[c], tmp_path / "few" / f"c{c}")
    with pytest.raises(DatasetError, match="5 class subfolders.*at least 6"):
        folder_split(f"folder:{tmp_path / 'few'}")
    shutil.copytree(photos, tmp_path / "broken")
    victim = sorted((tmp_path / "broken").glob("*/*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8 truncated")
    split = folder_split(f"folder:{tmp_path / 'broken'}")
    part = next(s for s, names in split.items() if victim.parent.name in names)
    with pytest.raises(DatasetError, match=re.escape(victim.name)):
        load_folder(f"folder:{tmp_path / 'broken'}", part, SMALL_SPEC, progress=False)
    with pytest.raises(ConfigError, match="apply to folder:PATH"):
        dataset_spec("omniglot", image_size=64)
    with pytest.raises(DatasetError, match="input spec"):
        load_dataset(f"folder:{photos}", "train")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_says_in_one_line_what_is_wrong(tmp_path):
    run = _cli("train", "--dataset", f"folder:{tmp_path / 'nowhere'}", "--out", "runs/x", cwd=tmp_path)
    assert run.returncode != 0 and "dataset folder not found" in run.stderr and "Traceback" not in run.stderr
    run = _cli("train", "--dataset", "tinyimagenet", "--image-size", "32", "--out", "runs/x", cwd=tmp_path)
    assert run.returncode != 0 and "apply to folder:PATH datasets" in run.stderr


#: The block's budgets, made small enough for the test tier (each must be in docs/training.md as written).
TEST_BUDGETS = {
    "--image-size 84": "--image-size 32",
    "--epochs 30": "--epochs 6 --val-tasks 50",
    "--width 64": "--width 32",
    "--iterations 3000": "--iterations 30 --first-order",
    "--val-every 500": "--val-every 30 --val-tasks 50",
    "fewshot package --run runs/my-photos --name": "fewshot package --tune-tasks 20 --calibration-tasks 20 --run runs/my-photos --name",
    "fewshot package --run runs/my-photos-maml --name": "fewshot package --calibration-tasks 20 --run runs/my-photos-maml --name",
    "--tasks 100": "--tasks 50",
}


@pytest.fixture(scope="module")
def readme_run(photos):
    """The "Use your own images" block of docs/training.md, run by bash beside ``my-photos`` with the test budgets."""
    block = re.search(r"```bash\n(# Use your own images.*?)```", (ROOT / "docs/training.md").read_text(), re.S).group(1)
    for old, new in TEST_BUDGETS.items():
        assert old in block, f"docs/training.md block lost {old!r}"
        block = block.replace(old, new)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=photos.parent, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return photos.parent, run.stdout


def test_readme_block_trains_packages_and_evaluates_on_the_folder(readme_run, photos):
    work, out = readme_run
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {r["model"] for r in rows} == {"my-photos", "my-photos-maml"}
    for r in rows:
        assert r["dataset"] == f"folder:{photos.resolve()}" and r["tasks"] == 50
    sup = next(r for r in rows if r["model"] == "my-photos")
    assert sup["accuracy"] - sup["ci95"] > 100 / 5  # a few hundred steps on 18 classes: above chance
    card = json.loads((work / "my-models" / "my-photos" / "card.json").read_text())
    assert card["data"]["classes"] == folder_split(f"folder:{photos}")  # the split, recorded
    assert card["input"]["size"] == 32 and card["open_set"]["ways"] == 3  # 6 validation classes: 3 known, 3 distractors
    meta = json.loads((work / "my-models" / "my-photos-maml" / "card.json").read_text())
    assert "open_set" not in meta and "too few for open-set calibration" in out  # 5-way tasks need 10 classes: said


@pytest.mark.parametrize("model", ["my-photos", "my-photos-maml"])
def test_served_answers_on_the_folder_equal_the_bundle_in_process(readme_run, photos, model, tmp_path):
    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import load_bundle
    from fewshot.tools.launch import ServerProcess
    from fewshot_client import FewShotClient

    work, _ = readme_run
    bundle = load_bundle(work / "bundles" / model)
    family = open_bundle(bundle, "cpu", 1)
    data = load_dataset(f"folder:{photos}", "test", spec=family.spec)
    files = [f for c in data.class_names for f in sorted((photos / c).glob("*.jpg"))]
    assert len(files) == len(data.images)  # the decoded split, file for file
    sampler = EpisodeSampler(data, 5, 1, 4, seed=3)
    with ServerProcess(work / "bundles", tmp_path / "state", *SMALL) as server, FewShotClient(server.target) as client:
        for i in range(3):
            ep = sampler.episode(i)
            task = client.adapt([files[j] for j in ep.support], [data.class_names[data.labels[j]] for j in ep.support], model=model)
            served = task.classify([files[j] for j in ep.query])
            local = family.adapter(shots=1).adapt(family.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
            probs = local.classify(family.spec.normalize(data.images[ep.query])).numpy()
            names = [data.class_names[c] for c in ep.classes]
            assert [p.label for p in served] == [names[k] for k in probs.argmax(1)]
            np.testing.assert_allclose([[p.scores[n] for n in names] for p in served], probs, atol=1e-4)
