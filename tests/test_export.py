"""Export: bundles round-trip through the registry, corrupt bundles are refused, Triton configs parse."""

import json
import shutil

import onnx
import pytest
import torch
from support import SHIPPED

from fewshot.export.loader import bundle_adapter
from fewshot.export.registry import BundleError, Registry, load_bundle
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import methods_of, open_shipped, parts_in
from fewshot.models.zoo import load_model


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_predictions_match_the_torch_path(exported, name):
    out, _ = exported
    registry = Registry.load(out)
    bundle = registry.get(name)
    model = load_model(name)
    heads = methods_of(model.card)
    reference = open_shipped(model, "torch", "cpu")  # the shipped weights, every part in torch
    data = load_dataset(model.card.dataset, "test")
    ways = model.card.limits.get("min_ways", 5)
    sampler = EpisodeSampler(data, ways, 1, 15, seed=3)
    for head in heads:
        ours, ref = bundle_adapter(bundle, head, "cpu"), reference.adapter(head)
        agree = total = 0
        for i in range(5):
            ep = sampler.episode(i)
            xs, ys = model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels)
            xq = model.spec.normalize(data.images[ep.query])
            task = ours.adapt(xs, ys)
            a, b = task.classify(xq), ref.adapt(xs, ys).classify(xq)
            same = int((a.argmax(1) == b.argmax(1)).sum())
            agree, total = agree + same, total + len(a)
            if not task.transductive:
                assert same == len(a), (name, head, i)
                assert (a - b).abs().max() < 1e-3
        # A transductive head (LaplacianShot's kNN graph over the queries) is discontinuous in the
        # features: float32 differences of ~5e-6 between ONNX Runtime and torch kernels can change a
        # neighbour set and flip a query near a tie.
        assert agree >= 0.99 * total, (name, head, agree, total)


def _copy(bundle_dir, tmp_path):
    dst = tmp_path / bundle_dir.name
    shutil.copytree(bundle_dir, dst)
    return dst


def test_corrupt_bundles_are_refused_with_the_cause(exported, tmp_path):
    out, _ = exported
    src = out / SHIPPED[0]
    flipped = _copy(src, tmp_path / "a")
    blob = bytearray((flipped / "backbone.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (flipped / "backbone.onnx").write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"backbone.onnx does not match its sha256"):
        load_bundle(flipped)
    missing = _copy(src, tmp_path / "b")
    (missing / "meta.safetensors").unlink()
    with pytest.raises(BundleError, match=r"meta.safetensors is missing"):
        load_bundle(missing)
    truncated = _copy(src, tmp_path / "c")
    (truncated / "backbone.onnx").write_bytes((truncated / "backbone.onnx").read_bytes()[:100])
    with pytest.raises(BundleError, match=r"backbone.onnx has 100 bytes"):
        load_bundle(truncated)
    future = _copy(src, tmp_path / "d")
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"unknown schema_version 99"):
        load_bundle(future)
    garbled = _copy(src, tmp_path / "e")
    (garbled / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json is not valid JSON"):
        load_bundle(garbled)
    assert load_bundle(src).name == SHIPPED[0]


def _parse_config(folder):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder.name
    return config


def _check_onnx_model(folder, config) -> None:
    """``config`` serves ``1/model.onnx`` with its exact inputs and outputs (batch axis owned by Triton
    when ``max_batch_size > 0``: the backbones and stems, dynamically batched; the networks run per request)."""
    from tritonclient.grpc import model_config_pb2

    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    batched = config.max_batch_size > 0
    assert batched == folder.name.endswith(("_backbone", "_stem")) and batched == config.HasField("dynamic_batching")
    assert len(config.instance_group) == 1
    for spec, tensor in ((config.input, graph.input), (config.output, graph.output)):
        assert [s.name for s in spec] == [t.name for t in tensor]
        for s, t in zip(spec, tensor):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]
            assert list(s.dims) == (dims[1:] if batched else dims) and (not batched or dims[0] == -1)
            assert s.data_type == model_config_pb2.TYPE_FP32 and t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def _expected_models(out) -> list[str]:
    bundles = Registry.load(out).bundles.values()
    return sorted(f"{b.name}_{p.name}" for b in bundles for p in parts_in(b.manifest))


def test_triton_configs_parse_and_match_the_onnx_files(exported):
    out, repo = exported
    folders = sorted(p for p in repo.iterdir() if p.is_dir())
    assert [f.name for f in folders] == _expected_models(out)  # no few-shot pair unless a state dir is given
    for folder in folders:
        config = _parse_config(folder)
        assert config.platform == "onnxruntime_onnx" and not config.backend and not (folder / "1" / "model.py").exists()
        _check_onnx_model(folder, config)


def test_python_backend_variant_serves_the_same_models_and_the_few_shot_pair(exported, tmp_path):
    from tritonclient.grpc import model_config_pb2

    from fewshot.export.triton import write_bundle_models
    from fewshot.server import triton_models

    out, _ = exported
    for bundle in Registry.load(out).bundles.values():
        write_bundle_models(tmp_path / "repo", bundle, "python", tmp_path / "state")
    folders = {p.name: p for p in (tmp_path / "repo").iterdir()}
    assert sorted(folders) == sorted(_expected_models(out) + ["fewshot_adapt", "fewshot_classify"])
    for name, folder in folders.items():
        config = _parse_config(folder)
        assert config.backend == "python" and not config.platform and (folder / "1" / "model.py").is_file()
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.parameters["threads"].string_value == "1"
        if name.startswith("fewshot_"):
            continue
        _check_onnx_model(folder, config)
    string, optional = model_config_pb2.TYPE_STRING, {"method", "settings"}
    adapt, classify = _parse_config(folders["fewshot_adapt"]), _parse_config(folders["fewshot_classify"])
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in adapt.input] == [
        (n, string, d, n in optional) for n, d in (("model", [1]), ("labels", [-1]), ("images", [-1]), ("method", [1]), ("settings", [1]))
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in adapt.output] == [("task_id", string, [1]), ("labels", string, [-1])]
    fp64, boolean = model_config_pb2.TYPE_FP64, model_config_pb2.TYPE_BOOL
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in classify.input] == [
        ("task_id", string, [1], False),
        ("images", string, [-1], False),
        ("reject_unknown", boolean, [1], True),
        ("threshold", fp64, [1], True),
        ("target_recall", fp64, [1], True),
        ("explain", model_config_pb2.TYPE_INT32, [1], True),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in classify.output] == [
        ("probabilities", model_config_pb2.TYPE_FP32, [-1, -1]),
        ("labels", string, [-1]),
        ("unknown", boolean, [-1]),
        ("scores", fp64, [-1]),
        ("threshold", fp64, [1]),
        ("nearest_index", model_config_pb2.TYPE_INT32, [-1, -1]),
        ("nearest_label", string, [-1, -1]),
        ("nearest_similarity", fp64, [-1, -1]),
    ]
    for config in (adapt, classify):
        assert config.max_batch_size == 0
        assert config.parameters["bundle_dir"].string_value == str(out.resolve())
        assert config.parameters["state_dir"].string_value == str((tmp_path / "state").resolve())
    for name, cls in (("fewshot_adapt", "AdaptModel"), ("fewshot_classify", "ClassifyModel")):
        assert f"import {cls} as TritonPythonModel" in (folders[name] / "1" / "model.py").read_text()
        assert hasattr(getattr(triton_models, cls), "execute")


def test_export_command_writes_the_python_variant_with_the_few_shot_pair(tmp_path):
    from fewshot.cli import main

    name = "omniglot-conv4-directsum"
    assert (
        main(
            [
                "export",
                "--model",
                name,
                "--out",
                str(tmp_path / "bundles"),
                "--triton-repo",
                str(tmp_path / "repo"),
                "--triton-backend",
                "python",
                "--triton-state-dir",
                str(tmp_path / "state"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["fewshot_adapt", "fewshot_classify", f"{name}_backbone"]
    assert _parse_config(tmp_path / "repo" / f"{name}_backbone").backend == "python"
    assert _parse_config(tmp_path / "repo" / "fewshot_adapt").parameters["state_dir"].string_value == str(tmp_path / "state")


def test_registry_errors_are_clear(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Registry.load(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="holds no bundle"):
        Registry.load(tmp_path)


def test_fp32_parity_tolerance_scales_with_the_output_magnitude():
    from fewshot.export.bundle import ExportError, _check_fp32

    _check_fp32("m", "backbone.onnx", 1.83e-4, 345.0)  # a meta network's body: features in the hundreds
    _check_fp32("m", "network.onnx", 9e-5, 0.01)  # small outputs still get the absolute 1e-4
    with pytest.raises(ExportError, match=r"m: backbone.onnx differs from torch by 2.00e-04 > 0.0001 x max\(1, 1.5\)"):
        _check_fp32("m", "backbone.onnx", 2e-4, 1.5)
