"""Any number of classes on the inner-loop models (issue 16, part 3): a prototype head (Proto-MAML) adapts
2- to 50-way tasks; over gRPC each served prediction equals ``fewshot eval`` on the same tasks, at every
number of classes RESULTS.md reports (the Triton twin is in ``test_triton.py``)."""

from __future__ import annotations

import json

import grpc
import pytest
from support import SHIPPED

from fewshot.cli import main as fewshot_main
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import open_shipped
from fewshot.models.meta.family import WAY_SWEEP
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model
from fewshot_client._proto import fewshot_pb2 as pb
from fewshot_client._proto import fewshot_pb2_grpc as pb_grpc

INNER_LOOP = [n for n in SHIPPED if load_model(n).card.family == "inner_loop"]
TASKS = 2  # per (model, ways)


def _cases() -> list[tuple[str, int]]:
    """Every inner-loop model at the swept ways, and the Omniglot ones at 20 ways (Lake et al.'s benchmark)."""
    cases = [(n, w) for n in INNER_LOOP for w in WAY_SWEEP]
    return cases + [(n, 20) for n in INNER_LOOP if load_model(n).card.dataset == "omniglot"]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.FewShotStub(channel)


def test_the_inner_loop_models_adapt_any_number_of_classes_in_their_cards_range(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    for name in INNER_LOOP:
        card = load_model(name).card
        assert card.family_blocks["inner_loop"]["head_init"] == "prototypes", name
        assert (models[name].min_ways, models[name].max_ways) == (2, 50) == (card.limits["min_ways"], card.limits["max_ways"])
        assert open_shipped(load_model(name), "torch", "cpu").way_range() == (2, 50)


@pytest.mark.parametrize("name,ways", _cases())
def test_served_predictions_equal_fewshot_eval_at_every_number_of_classes(stub, tmp_path, name, ways):
    card = load_model(name).card
    shots = int(card.training["config"]["shots"])
    out = tmp_path / "eval.json"
    assert fewshot_main(["eval", "--model", name, "--tasks", str(TASKS), "--ways", str(ways), "--shots", str(shots),
                         "--queries", "3", "--seed", "0", "--predictions", str(out)]) == 0
    expected = json.loads(out.read_text())["predictions"]
    data = load_dataset(card.dataset, "test")
    sampler = EpisodeSampler(data, ways, shots, 3, seed=0)
    for i in range(TASKS):
        ep = sampler.episode(i)
        support = [pb.LabelledImage(image=pb.Image(encoded=png(data.images[j])), label=f"class-{c}")
                   for j, c in zip(ep.support, ep.support_labels)]
        task = stub.Adapt(pb.AdaptRequest(model=name, support=support))
        assert list(task.labels) == [f"class-{c}" for c in range(ways)]
        response = stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=[pb.Image(encoded=png(data.images[j])) for j in ep.query]))
        assert all(len(p.probabilities) == ways for p in response.predictions)
        served = [int(p.ranked[0].label.removeprefix("class-")) for p in response.predictions]
        assert served == expected[i], (name, ways, i)

