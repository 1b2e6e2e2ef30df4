"""Any number of classes on the inner-loop models (issue 16, part 3): a shipped inner-loop model whose head
initialisation does not fix the number of classes (``inner_loop.head_init`` ``shared``: Ye and Chao's one
meta-learned row replicated per class; every shipped CxGrad and MAML model) adapts 2- to 50-way tasks, and
over gRPC each served prediction equals the bundle's own family object in process, at 2, 3, 5, 10 and 20
ways. A learned head (none shipped now) refuses another number of classes: ``tests/test_inner_loop.py``."""

from __future__ import annotations

import functools

import grpc
import numpy as np
import pytest
import torch

from fewshot.export.loader import open_bundle
from fewshot.export.registry import load_bundle
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.inner_loop.family import WAY_SWEEP
from fewshot.models.packaging import MAX_WAYS, MIN_WAYS
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model, shipped_models
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

INNER_LOOP = [n for n in shipped_models() if load_model(n).card.family == "inner_loop"]
ANY_WAYS = [n for n in INNER_LOOP if load_model(n).card.family_blocks["inner_loop"].get("head_init", "learned") != "learned"]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.FewShotStub(channel)


@functools.cache
def _test_split(dataset: str):
    return load_dataset(dataset, "test")


def _support(data, ep) -> list[pb.LabelledImage]:
    return [
        pb.LabelledImage(image=pb.Image(encoded=png(data.images[j])), label=f"class-{c}") for j, c in zip(ep.support, ep.support_labels)
    ]


def test_listmodels_reports_the_range_of_classes_of_every_inner_loop_model(stub):
    """2..50 with a shared head; a learned head's own rows (its training ways) otherwise; as the card says."""
    served = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {"omniglot-conv4-cxgrad", "omniglot-conv4-maml", "tinyimagenet-conv4-cxgrad", "tinyimagenet-conv4-maml"} <= set(ANY_WAYS)
    for name in INNER_LOOP:
        card = load_model(name).card
        expected = (MIN_WAYS, MAX_WAYS) if name in ANY_WAYS else (card.training["config"]["ways"],) * 2
        assert (served[name].min_ways, served[name].max_ways) == expected == (card.limits["min_ways"], card.limits["max_ways"])


#: Every shipped inner-loop model of any number of classes at the WAY_SWEEP ways and at 20 (Lake et al.'s Omniglot benchmark).
CASES = [(n, w) for n in ANY_WAYS for w in (*WAY_SWEEP, 20)]


@pytest.mark.parametrize("name,ways", CASES)
def test_served_predictions_equal_the_bundle_in_process_at_every_number_of_classes(stub, exported, name, ways):
    family = open_bundle(load_bundle(exported[0] / name), "cpu", 1)
    adapter, spec = family.adapter(shots=1), family.spec
    data = _test_split(load_model(name).card.dataset)
    for i in range(2):
        ep = EpisodeSampler(data, ways, 1, 3, seed=100 * ways + i).episode(0)
        task = stub.Adapt(pb.AdaptRequest(model=name, support=_support(data, ep)))
        assert list(task.labels) == [f"class-{c}" for c in range(ways)]
        response = stub.Classify(
            pb.ClassifyRequest(task_id=task.task_id, queries=[pb.Image(encoded=png(data.images[j])) for j in ep.query])
        )
        served = np.array([list(p.probabilities) for p in response.predictions])
        local = adapter.adapt(spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels))
        expected = local.classify(spec.normalize(data.images[ep.query])).numpy()
        assert served.shape == expected.shape == (len(ep.query), ways)
        assert np.array_equal(served.argmax(1), expected.argmax(1)), (ways, i)
        # the server's inner loop runs on other threads: float sums round apart
        np.testing.assert_allclose(served, expected, atol=1e-3)
