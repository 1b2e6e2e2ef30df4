"""Task state round trips: every registered head state stores and restores itself, blobs of the
earlier hand-written format still load, and a damaged blob is a StateError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from fewshot.models.heads.base import STATE_KINDS
from fewshot.models.heads.centroid import CentroidHead
from fewshot.models.heads.laplacian_shot import LaplacianShotHead
from fewshot.models.heads.logreg import LogRegHead
from fewshot.models.metric_adapter import MetricFamily, MetricTask
from fewshot.server.state import StateError, dump_task, load_task

pytestmark = pytest.mark.unit


class _Model:
    """What ``load_task`` needs of a metric model: its family's ``decode`` and its extractor (features
    pass through here)."""

    extract = staticmethod(lambda x: x)
    decode = MetricFamily.decode


def _support(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(15, 32, generator=g), torch.arange(15) % 5, torch.randn(9, 32, generator=g), torch.randn(32, generator=g)


@pytest.mark.parametrize(
    "make",
    [
        lambda c: CentroidHead("CL2N", c),
        lambda c: CentroidHead("L2N", None),
        lambda c: LaplacianShotHead(0.7, 3, "CL2N", c, rectify=True),
        lambda c: LaplacianShotHead(0.3, 2, "UN", None),
        lambda c: LogRegHead(1e-3, "CL2N", c),
        lambda c: LogRegHead(0.1, "L2N", None),
    ],
)
def test_every_head_state_round_trips(make):
    features, labels, query, center = _support()
    task = MetricTask(make(center).fit(features, labels), _Model.extract)
    restored = load_task(dump_task(task), _Model())
    assert type(restored.state) is type(task.state) and torch.equal(restored.classify(query), task.classify(query))


def test_the_registry_knows_the_shipped_heads():
    assert {"centroid", "laplacianshot", "logreg"} <= set(STATE_KINDS)


def test_blobs_of_the_earlier_format_still_load():
    features, labels, query, center = _support(1)
    state = LaplacianShotHead(0.5, 3, "CL2N", center).fit(features, labels)
    meta = {"kind": "laplacianshot", "n_classes": 5, "transform": "CL2N", "lam": 0.5, "knn": 3, "rectify": False}
    blob = st_save({"support": state.support, "labels": state.labels, "center": center}, metadata={"fewshot": json.dumps(meta)})
    assert torch.equal(load_task(blob, _Model()).classify(query), state.classify(query))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x08" + bytes(7) + b"{}",
        st_save({"x": torch.zeros(1)}, metadata={"fewshot": '{"kind": "centroid"}'}),
        st_save({"x": torch.zeros(1)}, metadata={"fewshot": '{"kind": "svm"}'}),
    ],
)
def test_damaged_or_unknown_blobs_are_state_errors(blob):
    with pytest.raises(StateError):
        load_task(blob, _Model())
