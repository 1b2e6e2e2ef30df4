"""Shared fixtures: real data from ../shared/data (or $FEWSHOT_DATA) and the shipped models."""

from __future__ import annotations

import pytest
import torch

from fewshot.models.data import load_omniglot

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def omniglot_test():
    return load_omniglot("test")


@pytest.fixture(scope="session")
def omniglot_model():
    from fewshot.models.zoo import load_model

    return load_model("omniglot-conv4-directsum")
