"""One source for the accuracy figures: RESULTS.md's generated block and every model card's accuracy
are what `results.json` renders to (`python -m fewshot.tools.results --render`), and every row's
settings come from the `fewshot eval` command stored with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fewshot.models.card import ModelCard
from fewshot.models.zoo import ZOO_DIR, shipped_models
from fewshot.tools.results import card_accuracy, row_key, write_markdown

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
ROWS = json.loads((ROOT / "results.json").read_text())


def test_results_md_is_rendered_from_results_json(tmp_path):
    copy = tmp_path / "RESULTS.md"
    shutil.copyfile(ROOT / "RESULTS.md", copy)
    write_markdown(ROWS, copy)
    assert copy.read_text() == (ROOT / "RESULTS.md").read_text(), "RESULTS.md is stale: run python -m fewshot.tools.results --render"


@pytest.mark.parametrize("name", shipped_models())
def test_each_card_holds_exactly_its_rows_of_results_json(name):
    assert ModelCard.load(ZOO_DIR / name).accuracy == card_accuracy(ROWS, name)


def test_rows_are_unique_and_name_their_command():
    assert len({row_key(r) for r in ROWS}) == len(ROWS)
    for r in ROWS:
        command = r["command"]
        assert command.startswith("fewshot eval ") and f"--model {r['model']} " in command
        assert f"--ways {r['ways']} --shots {r['shots']} " in command and f"--tasks {r['tasks']} " in command
        assert f"--head {r['head']} " in command and f"--seed {r['seed']}" in command


def test_both_metric_flagships_have_logistic_regression_rows():
    for model in ("omniglot-conv4-directsum", "tinyimagenet-conv4-sce-nca-directsum"):
        rows = {(r["ways"], r["shots"]) for r in ROWS if r["model"] == model and r["head"] == "logreg" and r["tasks"] == 600}
        assert {(5, 1), (5, 5)} <= rows, model
