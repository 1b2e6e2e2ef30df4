"""Export: bundles round-trip through the registry, corrupt bundles are refused, Triton configs parse."""

import json
import shutil

import onnx
import pytest
import torch

from fewshot.export.loader import bundle_adapter
from fewshot.export.registry import BundleError, Registry, load_bundle
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.metric_adapter import MetricAdapter
from fewshot.models.zoo import load_model

from conftest import SHIPPED


def _torch_adapter(model, head):
    if model.card["family"] == "inner_loop":
        return model.adapter("support", device="cpu")
    return MetricAdapter(model.extractor("torch", "cpu"), model.head(head))


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_predictions_match_the_torch_path(exported, name):
    out, _ = exported
    registry = Registry.load(out)
    bundle = registry.get(name)
    model = load_model(name)
    heads = ["centroid", "laplacianshot"] if model.card["family"] == "metric" else [model.card["method"]]
    data = load_dataset(model.card["data"]["dataset"], "test")
    ways = model.card["limits"].get("min_ways", 5)
    sampler = EpisodeSampler(data, ways, 1, 15, seed=3)
    for head in heads:
        ours, ref = bundle_adapter(bundle, head, "cpu"), _torch_adapter(model, head)
        for i in range(5):
            ep = sampler.episode(i)
            xs, ys = model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels)
            xq = model.spec.normalize(data.images[ep.query])
            a = ours.adapt(xs, ys).classify(xq)
            b = ref.adapt(xs, ys).classify(xq)
            assert torch.equal(a.argmax(1), b.argmax(1)), (name, head, i)
            assert (a - b).abs().max() < 1e-3


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


def test_triton_configs_parse_and_match_the_onnx_files(exported):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, repo = exported
    folders = sorted(p for p in repo.iterdir() if p.is_dir())
    assert [f.name for f in folders] == sorted(f"{n}_backbone" for n in SHIPPED)
    for folder in folders:
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == folder.name and config.platform == "onnxruntime_onnx" and config.max_batch_size > 0
        assert config.HasField("dynamic_batching") and len(config.instance_group) == 1
        graph = onnx.load(str(folder / "1" / "model.onnx")).graph
        for spec, tensor in ((config.input, graph.input), (config.output, graph.output)):
            assert [s.name for s in spec] == [t.name for t in tensor]
            for s, t in zip(spec, tensor):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]
                assert dims[0] == -1 and list(s.dims) == dims[1:]  # batch axis owned by Triton
                assert s.data_type == model_config_pb2.TYPE_FP32 and t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_registry_errors_are_clear(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Registry.load(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="holds no bundle"):
        Registry.load(tmp_path)
