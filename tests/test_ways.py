"""Any number of classes on the inner-loop models (issue 16, part 3): with a head initialisation that does
not fix the number of classes (``inner_loop.head_init`` ``prototypes`` or ``shared``), an inner-loop bundle
adapts 2- to 50-way tasks; over gRPC each served prediction equals the bundle's own family object in
process, at 2, 3, 5, 10 and 20 ways. The shipped CxGrad and MAML models keep their 5-row learned head
(RESULTS.md: the Proto-MAML fine-tune lost CxGrad's margin), so the bundle here is the shipped Omniglot
CxGrad one with its manifest set to a prototype head: the serving path is what is under test, not accuracy."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
import torch
from support import SMALL

from fewshot.export.loader import open_bundle
from fewshot.export.registry import load_bundle
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.meta.family import WAY_SWEEP
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model
from fewshot.tools.process import ServerProcess
from fewshot_client._proto import fewshot_pb2 as pb
from fewshot_client._proto import fewshot_pb2_grpc as pb_grpc

CXGRAD = "omniglot-conv4-cxgrad"
VARIANT = "omniglot-conv4-cxgrad-prototypes"


@pytest.fixture(scope="module")
def variant(exported, tmp_path_factory):
    """The exported CxGrad bundle, renamed, with a prototype head and the 2..50 range in its manifest."""
    root = tmp_path_factory.mktemp("any-ways")
    folder = root / VARIANT
    shutil.copytree(exported[0] / CXGRAD, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = VARIANT
    manifest["inner_loop"]["head_init"] = "prototypes"
    manifest["limits"].update(min_ways=2, max_ways=50)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return load_bundle(folder)


@pytest.fixture(scope="module")
def stub(variant, tmp_path_factory):
    with ServerProcess(variant.path.parent, tmp_path_factory.mktemp("any-ways-state"), *SMALL) as server, \
            grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.FewShotStub(channel)


def test_listmodels_reports_the_range_of_classes_of_each_head(stub, server):
    """2..50 with a prototype head; the shipped learned head's own rows, 5, for the shipped model."""
    (info,) = stub.ListModels(pb.ListModelsRequest()).models
    assert (info.name, info.min_ways, info.max_ways) == (VARIANT, 2, 50)
    with grpc.insecure_channel(server.target) as channel:
        shipped = {m.name: m for m in pb_grpc.FewShotStub(channel).ListModels(pb.ListModelsRequest()).models}
    card = load_model(CXGRAD).card
    assert (shipped[CXGRAD].min_ways, shipped[CXGRAD].max_ways) == (5, 5) == (card.limits["min_ways"], card.limits["max_ways"])


@pytest.mark.parametrize("ways", [*WAY_SWEEP, 20])
def test_served_predictions_equal_the_bundle_in_process_at_every_number_of_classes(stub, variant, omniglot_test, ways):
    family = open_bundle(variant, "cpu", 1)
    adapter = family.adapter(shots=1)
    spec = family.spec
    for i in range(2):
        ep = EpisodeSampler(omniglot_test, ways, 1, 3, seed=100 * ways + i).episode(0)
        support = [pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[j])), label=f"class-{c}")
                   for j, c in zip(ep.support, ep.support_labels)]
        task = stub.Adapt(pb.AdaptRequest(model=VARIANT, support=support))
        assert list(task.labels) == [f"class-{c}" for c in range(ways)]
        response = stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=[pb.Image(encoded=png(omniglot_test.images[j])) for j in ep.query]))
        served = np.array([list(p.probabilities) for p in response.predictions])
        local = adapter.adapt(spec.normalize(omniglot_test.images[ep.support]), torch.as_tensor(ep.support_labels))
        expected = local.classify(spec.normalize(omniglot_test.images[ep.query])).numpy()
        assert served.shape == expected.shape == (len(ep.query), ways)
        assert np.array_equal(served.argmax(1), expected.argmax(1)), (ways, i)
        # the server's inner loop runs on other threads: float sums round apart, and a prototype head's
        # logits (-||h - m_c||^2, in the hundreds) carry that into the fourth decimal of a probability
        np.testing.assert_allclose(served, expected, atol=1e-3)


def test_the_learned_head_refuses_another_number_of_classes_with_its_own(server, omniglot_test):
    ep = EpisodeSampler(omniglot_test, 7, 1, 1, seed=3).episode(0)
    support = [pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[j])), label=f"c{c}")
               for j, c in zip(ep.support, ep.support_labels)]
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.FewShotStub(channel).Adapt(pb.AdaptRequest(model=CXGRAD, support=support))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapts 5-way tasks" in err.value.details()
