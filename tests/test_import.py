"""The user's own backbone (issue 18, part 2): ``fewshot import --onnx``.

The graph checks say what is wrong; one of our own backbones (the shipped Omniglot direct-sum one) exported
to a plain ONNX file with foreign input and output names and imported as if it were foreign serves, over a
real server, the shipped bundle's predictions on 20 tasks; the import block of docs/bundles.md, with a sample and a
validation folder, centres, tunes and calibrates the bundle, and its open-set option answers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import SMALL

from fewshot.export.importer import ImportError_, check_embedder
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "omniglot-conv4-directsum"


def _onnx(
    module: torch.nn.Module, path: Path, shape=(2, 1, 28, 28), inputs=("pixel_values",), outputs=("embedding",), dynamic: bool = True
) -> Path:
    args = tuple(torch.zeros(shape) for _ in inputs)
    axes = {n: {0: "n"} for n in (*inputs, *outputs)} if dynamic else None
    torch.onnx.export(
        module.eval(),
        args,
        str(path),
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    return path


class _Two(torch.nn.Module):
    def forward(self, a, b):
        return (a + b).flatten(1)


class _Maps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.unit
def test_graph_checks_say_what_is_wrong(tmp_path):
    import onnx

    def check(path: Path, channels: int = 1, size: int = 28):
        return check_embedder(onnx.load(str(path)), channels, size)

    flat = _onnx(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()), tmp_path / "ok.onnx")
    assert check(flat) == ("pixel_values", "embedding")
    with pytest.raises(ImportError_, match="takes 1 channels, not --channels 3"):
        check(flat, channels=3)
    with pytest.raises(ImportError_, match="height 28, not --input-size 32"):
        check(flat, size=32)
    with pytest.raises(ImportError_, match="2 inputs"):
        check(_onnx(_Two(), tmp_path / "two.onnx", inputs=("a", "b")))
    with pytest.raises(ImportError_, match="flatten it"):
        check(_onnx(_Maps(), tmp_path / "maps.onnx"))
    with pytest.raises(ImportError_, match="fixed batch of 2"):
        check(_onnx(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()), tmp_path / "fixed.onnx", dynamic=False))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_refuses_what_is_not_an_embedder_in_one_line(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    run = _cli(
        "import",
        "--onnx",
        "junk.onnx",
        "--name",
        "x",
        "--input-size",
        "28",
        "--channels",
        "1",
        "--mean",
        "0.5",
        "--std",
        "0.2",
        "--out",
        "b",
        cwd=tmp_path,
    )
    assert run.returncode == 2 and "is not an ONNX model" in run.stderr and "Traceback" not in run.stderr
    _onnx(_Maps(), tmp_path / "maps.onnx")
    run = _cli(
        "import",
        "--onnx",
        "maps.onnx",
        "--name",
        "x",
        "--input-size",
        "28",
        "--channels",
        "1",
        "--mean",
        "0.5",
        "--std",
        "0.2",
        "--out",
        "b",
        cwd=tmp_path,
    )
    assert run.returncode == 2 and "flatten it in the model" in run.stderr and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """The shipped Omniglot direct-sum backbone as a plain ONNX file, input ``pixel_values``, output ``embedding``."""
    from fewshot.models.zoo import load_model

    return _onnx(load_model(SHIPPED).backbone, tmp_path_factory.mktemp("foreign") / "my-embedder.onnx")


def test_an_imported_backbone_serves_the_shipped_models_predictions(foreign, exported, omniglot_test, tmp_path):
    """No sample folder: features L2-normalised, as the shipped model's own (L2N) heads; 20 seeded 5-way
    1-shot tasks, nearest centroid (the default method), over one real server holding both bundles."""
    from fewshot.tools.launch import ServerProcess
    from fewshot_client import FewShotClient

    bundles = tmp_path / "bundles"
    run = _cli(
        "import",
        "--onnx",
        str(foreign),
        "--name",
        "imported",
        "--input-size",
        "28",
        "--channels",
        "1",
        "--mean",
        "0.92",
        "--std",
        "0.22",
        "--out",
        str(bundles),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    (bundles / SHIPPED).symlink_to(exported[0] / SHIPPED, target_is_directory=True)
    manifest = json.loads((bundles / "imported" / "manifest.json").read_text())
    assert manifest["heads"]["centroid"]["transform"] == "L2N" and manifest["feature_dim"] == 3136
    sampler = EpisodeSampler(omniglot_test, 5, 1, 3, seed=11)
    with ServerProcess(bundles, tmp_path / "state", *SMALL) as server, FewShotClient(server.target) as client:
        for i in range(20):
            ep = sampler.episode(i)
            support = [png(omniglot_test.images[j]) for j in ep.support]
            labels = [f"c{c}" for c in ep.support_labels]
            queries = [png(omniglot_test.images[j]) for j in ep.query]
            ours = client.adapt(support, labels, model="imported").classify(queries, top_k=5)
            theirs = client.adapt(support, labels, model=SHIPPED).classify(queries, top_k=5)
            assert [p.label for p in ours] == [p.label for p in theirs]
            # same logits; only the shipped model's calibrated temperature separates the probabilities
            assert [[lab for lab, _ in p.ranked] for p in ours] == [[lab for lab, _ in p.ranked] for p in theirs]


def test_readme_block_imports_with_sample_and_validation_folders(foreign, tmp_path):
    """The "Use your own backbone" import command, on Omniglot validation classes as PNG files."""
    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import load_bundle
    from fewshot.models.zoo import load_model

    val = load_dataset("omniglot", "val")
    photos = tmp_path / "my-photos"
    for c, ix in enumerate(val.indices_by_class()[:12]):
        (photos / "val" / f"class{c:02d}").mkdir(parents=True)
        for j in ix:
            Image.fromarray(val.images[j][..., 0]).save(photos / "val" / f"class{c:02d}" / f"{j}.png")
    (tmp_path / "my-embedder.onnx").write_bytes(foreign.read_bytes())
    block = re.search(r"```bash\n(# Use your own backbone.*?)```", (ROOT / "docs/bundles.md").read_text(), re.S).group(1)
    command = next(line for line in block.replace("\\\n", " ").splitlines() if line.startswith("fewshot import"))
    subs = {
        "--input-size 224": "--input-size 28 --channels 1",
        "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225": "--mean 0.92 --std 0.22",
        "--out bundles": "--out bundles --tune-tasks 20 --calibration-tasks 20",
    }
    for old, new in subs.items():
        assert old in command, f"docs/bundles.md import command lost {old!r}"
        command = command.replace(old, new)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = load_bundle(tmp_path / "bundles" / "my-embedder")
    m = bundle.manifest
    assert m["heads"]["centering_vector"] == {"file": "meta.safetensors", "tensor": "center"}
    assert set(m["open_set"]["methods"]) == {"centroid", "laplacianshot", "logreg"} and m["open_set"]["ways"] == 5
    # the centre is the mean feature of the sample folder's images (all 240 of them here), by the foreign graph
    import onnxruntime as ort
    from safetensors.torch import load_file

    spec = load_model(SHIPPED).spec
    images = np.stack([np.asarray(Image.open(f))[..., None] for f in sorted(photos.rglob("*.png"))])
    features = ort.InferenceSession(str(foreign), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": spec.normalize(images).numpy()}
    )[0]
    center = load_file(str(bundle.file("meta.safetensors")))["center"].numpy()
    np.testing.assert_allclose(center, features.mean(0), rtol=1e-4, atol=1e-5)
    family = open_bundle(bundle, "cpu", 1)
    ep = EpisodeSampler(val, 5, 1, 2, seed=1).episode(0)
    task = family.adapter("laplacianshot", shots=1).adapt(family.spec.normalize(val.images[ep.support]), torch.as_tensor(ep.support_labels))
    assert task.classify(family.spec.normalize(val.images[ep.query])).shape == (10, 5)


def test_an_imported_backbone_serves_through_a_real_triton(foreign, omniglot_test, tmp_path):
    """``--triton-repo``: the imported bundle's backbone model in a real ``tritonserver`` (python backend, as the
    ``triton`` fixture's; skipped, with the reason, only where the binary cannot run) gives the features the
    bundle gives in process."""
    import tritonclient.grpc as grpcclient
    from fixtures.tritonserver import TritonProcess, TritonUnavailable

    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import load_bundle
    from fewshot.export.triton import backbone_model_name

    run = _cli(
        "import",
        "--onnx",
        str(foreign),
        "--name",
        "imported",
        "--input-size",
        "28",
        "--channels",
        "1",
        "--mean",
        "0.92",
        "--std",
        "0.22",
        "--out",
        "bundles",
        "--triton-repo",
        "repo",
        "--triton-backend",
        "python",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    family = open_bundle(load_bundle(tmp_path / "bundles" / "imported"), "cpu", 1)
    x = family.spec.normalize(omniglot_test.images[:64])
    model = backbone_model_name("imported")
    proc = TritonProcess(tmp_path / "repo", models=[model], log=tmp_path / "tritonserver.log")
    try:
        proc.start()
    except TritonUnavailable as exc:
        pytest.skip(f"the tritonserver binary cannot run here: {exc}")
    try:
        client = grpcclient.InferenceServerClient(proc.grpc_url)
        images = grpcclient.InferInput("images", list(x.shape), "FP32")
        images.set_data_from_numpy(x.numpy())
        served = client.infer(model, [images]).as_numpy("features")
        client.close()
    finally:
        proc.stop()
    np.testing.assert_allclose(served, family.extract(x).numpy(), atol=1e-5)
