"""The request core's settings (``server/requests.py``): ``AdaptSettings.values`` by name, the two fields that
predate it kept as aliases for old clients, and a clear refusal when they disagree or a value has no type."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from fewshot.server.errors import InvalidRequest
from fewshot.server.requests import settings_message, settings_of
from fewshot_proto import fewshot_pb2 as pb

pytestmark = pytest.mark.unit


def test_values_and_the_old_fields_read_as_one_set_of_settings():
    assert settings_of(settings_message({"inner_steps": 3, "bn": "support"})) == {"inner_steps": 3.0, "bn": "support"}
    old = pb.AdaptSettings(inner_steps=3, **{"lambda": 0.5})  # what a client built before `values` sends
    assert settings_of(old) == {"inner_steps": 3.0, "lambda": 0.5}
    both = settings_message({"inner_steps": 3})
    both.inner_steps = 3
    assert settings_of(both) == {"inner_steps": 3.0}
    assert settings_of(pb.AdaptSettings()) == {}


def test_a_contradiction_or_an_untyped_value_is_refused_naming_the_setting():
    both = settings_message({"inner_steps": 4})
    both.inner_steps = 3
    with pytest.raises(InvalidRequest, match="inner_steps is given twice with different values"):
        settings_of(both)
    untyped = pb.AdaptSettings()
    untyped.values["knn"].CopyFrom(struct_pb2.Value(bool_value=True))
    with pytest.raises(InvalidRequest, match="'knn' must be a number or a string, got bool_value"):
        settings_of(untyped)
    with pytest.raises(InvalidRequest, match="'bn' must be a number or a string, got list"):
        settings_message({"bn": ["support"]})
