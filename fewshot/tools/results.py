"""Measure the shipped models on 600 seeded test tasks; ``results.json`` is the one source of the figures.

``python -m fewshot.tools.results [--models M ...] [--heads H ...]`` runs ``fewshot eval ... --json`` for
what each model's family says to measure (:meth:`~fewshot.models.family.Family.result_runs`; the command
is stored with each row), replaces those rows in ``results.json`` and then renders from that file alone:
the generated block of ``RESULTS.md`` and the ``accuracy`` of every model card (which bundles carry and
``fewshot demo`` compares with). ``--render`` only renders. ``tests/test_results.py`` checks that
RESULTS.md and the cards are what ``results.json`` renders to.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewshot.cli import main as fewshot_main
from fewshot.models.card import ModelCard
from fewshot.models.family import family_of
from fewshot.models.zoo import ZOO_DIR, accuracy_key, load_model, shipped_models

SETTINGS = {"omniglot": [(5, 1), (5, 5), (20, 1), (20, 5)], "tinyimagenet": [(5, 1), (5, 5)]}
ORDER = [
    "omniglot-conv4-directsum",
    "tinyimagenet-conv4-sce",
    "tinyimagenet-conv4-sce-nca-sum",
    "tinyimagenet-conv4-sce-nca-directsum",
    "omniglot-conv4-maml",
    "omniglot-conv4-cxgrad",
    "tinyimagenet-conv4-maml",
    "tinyimagenet-conv4-cxgrad",
]
#: Fields of every row; the others are the settings the method ran with.
ROW_FIELDS = ("model", "dataset", "split", "ways", "shots", "queries", "head", "tasks", "seed", "accuracy", "ci95", "seconds", "command")
#: What an open-set row (``fewshot eval --open-set``) adds.
OPEN_SET_FIELDS = (
    "open_set",
    "auroc",
    "auroc_ci95",
    "score",
    "temperature",
    "threshold",
    "acceptance",
    "acceptance_ci95",
    "rejection",
    "rejection_ci95",
    "ece_before",
    "ece_after",
)
#: Open-set rows: the flagship model of each path and dataset, every method, 5-way 1- and 5-shot.
OPEN_SET_MODELS = ("omniglot-conv4-directsum", "tinyimagenet-conv4-sce-nca-directsum", "omniglot-conv4-cxgrad", "tinyimagenet-conv4-cxgrad")
OPEN_SET_SETTINGS = [(5, 1), (5, 5)]
START, END = "<!-- results.py: start -->", "<!-- results.py: end -->"


def run_eval(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fewshot_main(["eval", *args, "--json"])
    if code:
        raise SystemExit(f"fewshot eval {' '.join(args)} failed")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def row_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["ways"], row["shots"], row["head"], row.get("bn"), bool(row.get("open_set"))


def open_set_runs(card: dict[str, Any]) -> list[tuple[int, int, str, list[str]]]:
    """The open-set rows of the model at :data:`OPEN_SET_SETTINGS` (its family's
    :meth:`~fewshot.models.family.Family.open_set_runs`)."""
    return family_of(card).open_set_runs(card, OPEN_SET_SETTINGS)


def measure(
    names: list[str],
    heads: list[str] | None,
    tasks: int,
    seed: int,
    open_set: bool = False,
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """The rows of ``names`` (each handed to ``on_row`` as soon as it is measured, so a long run that is
    stopped keeps what it measured)."""
    rows = []
    for name in names:
        card = load_model(name).card.to_dict()
        dataset = card["data"]["dataset"]
        runs = open_set_runs(card) if open_set else family_of(card).result_runs(card, SETTINGS[dataset])
        for ways, shots, head, extra in runs:
            if heads and head not in heads:
                continue
            cli = [
                "--model",
                name,
                "--dataset",
                dataset,
                "--ways",
                str(ways),
                "--shots",
                str(shots),
                "--queries",
                "15",
                "--tasks",
                str(tasks),
                "--head",
                head,
                *extra,
                "--seed",
                str(seed),
            ]
            row = run_eval(cli)
            row["command"] = "fewshot eval " + " ".join(cli) + " --json"
            rows.append(row)
            on_row(row)
            extra_info = f" AUROC {row['auroc']:.2f} accept {row['acceptance']} reject {row['rejection']}" if open_set else ""
            print(
                f"{name:40s} {ways:2d}-way {shots}-shot {head:14s} {row.get('bn', ''):12s} {row['accuracy']:6.2f} "
                f"+- {row['ci95']:.2f}{extra_info}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else 99, r["ways"], r["shots"]))


def render(rows: list[dict], results_md: Path, zoo: Path = ZOO_DIR) -> None:
    """RESULTS.md's generated block and each model card's ``accuracy``, from ``rows`` alone."""
    write_markdown(rows, results_md)
    for name in shipped_models(zoo):
        path = zoo / name
        card = ModelCard.load(path)
        card.accuracy = card_accuracy(rows, name)
        card.save(path)


def card_accuracy(rows: list[dict], name: str) -> dict[str, Any]:
    """A card's ``accuracy`` block: its rows by :func:`~fewshot.models.zoo.accuracy_key`."""
    mine = [r for r in rows if r["model"] == name and not r.get("open_set")]
    return {
        "split": "test",
        "queries": 15,
        **{
            accuracy_key(r["ways"], r["shots"], r["head"], r.get("bn")): {k: r[k] for k in ("accuracy", "ci95", "tasks", "seed")}
            for r in mine
        },
    }


def _settings(row: dict) -> str:
    """The settings a row's method ran with (everything but the common fields), e.g. ``lambda=0.7``."""
    return ", ".join(f"{k}={v}" for k, v in row.items() if k not in ROW_FIELDS + OPEN_SET_FIELDS)


def write_markdown(rows: list[dict], path: Path) -> None:
    """Replace the generated block of ``path`` (between START and END), keeping the prose around it."""
    rows, opened = [r for r in rows if not r.get("open_set")], [r for r in rows if r.get("open_set")]
    tasks = sorted({r["tasks"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        START,
        f"Few-shot accuracy (%) of the shipped models on {'/'.join(map(str, tasks))} seeded test tasks (seed "
        f"{'/'.join(map(str, seeds))}, 15 queries per class),",
        "mean and 95% confidence interval 1.96*std/sqrt(T) over per-task accuracies. The same seed gives the same",
        "tasks for every model and head, so rows of one dataset and setting are paired comparisons.",
        "Generated from `results.json` by `make results` (`python -m fewshot.tools.results`); each row's command",
        "reproduces it alone.",
        "",
        "| model | dataset | setting | method | settings | accuracy | 95% CI | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['ways']}-way {r['shots']}-shot | {r['head']} | {_settings(r)} | "
            f"{r['accuracy']:.2f} | {r['ci95']:.2f} | `{r['command']}` |"
        )
    lines += [
        "",
        "Inner-loop rows: `bn=support` is BatchNorm with the support set's statistics, frozen after adaptation "
        "(batch-invariant, what the server uses); `bn=transductive` normalises each query batch with its own "
        "statistics (the papers' protocol).",
    ]
    if opened:
        lines += ["", *open_set_table(opened)]
    lines.append(END)
    block = "\n".join(lines)
    old = path.read_text() if path.exists() else "# Results\n\n" + START + END + "\n"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def open_set_table(rows: list[dict]) -> list[str]:
    """The open-set block: closed-set accuracy, AUROC of the calibrated score, acceptance and rejection at
    the calibrated threshold, ECE before and after temperature scaling."""

    def ci(r: dict, key: str) -> str:
        return "n/a" if r.get(key) is None else f"{r[key]:.2f} +- {r[key + '_ci95' if key != 'accuracy' else 'ci95']:.2f}"

    lines = [
        f"**Open set** (`fewshot eval --open-set`, the PEELER/SnaTCHer protocol): {'/'.join(sorted({str(r['tasks']) for r in rows}))} "
        "seeded test tasks, N-way K-shot support, 15 queries of each known class and 15 of each of N unseen "
        "test classes, classified in one call. AUROC: the method's calibrated score (chosen on validation), known vs "
        "unknown; accepted / rejected: known queries at or above and unknown queries below the threshold calibrated "
        "for 95% acceptance on validation episodes with distractors (`fewshot calibrate`, model card `open_set`). "
        "ECE (%, 15 bins, known queries): probabilities at T = 1, then with the calibrated temperature. Mean +- 95% CI "
        "over tasks. Anchors (other backbones and data, not paired with ours): PEELER (CVPR 2020), 5-way 1-shot "
        "mini-ImageNet AUROC 62.05 with a ResNet; SnaTCHer (CVPR 2021) about 68 (1-shot) and 77 (5-shot).",
        "",
        "| model | setting | method | score | T | closed-set accuracy | AUROC | known accepted | unknown rejected | ECE before -> after | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ways']}-way {r['shots']}-shot | {r['head']} | {r['score']} | {r['temperature']:.4g} | "
            f"{ci(r, 'accuracy')} | {ci(r, 'auroc')} | {ci(r, 'acceptance')} | {ci(r, 'rejection')} | "
            f"{r['ece_before']:.2f} -> {r['ece_after']:.2f} | `{r['command']}` |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="RESULTS.md")
    parser.add_argument("--models", nargs="*", help="default: every shipped model")
    parser.add_argument("--heads", nargs="*", help="only these methods (e.g. logreg); default: all")
    parser.add_argument("--render", action="store_true", help="only render RESULTS.md and the cards from results.json")
    parser.add_argument(
        "--open-set", action="store_true", help="measure the open-set rows (default models: " + ", ".join(OPEN_SET_MODELS) + ")"
    )
    args = parser.parse_args()
    store = Path(args.out).with_name("results.json")
    rows = json.loads(store.read_text()) if store.exists() else []
    if not args.render:
        names = args.models or [n for n in (OPEN_SET_MODELS if args.open_set else ORDER) if (ZOO_DIR / n / "card.json").exists()]
        if not args.heads:  # a model measured anew loses the rows of settings it no longer has
            rows = [r for r in rows if r["model"] not in names or bool(r.get("open_set")) != args.open_set]

        def keep(row: dict) -> None:  # results.json, RESULTS.md and the cards agree after every row
            nonlocal rows
            rows = sort_rows([r for r in rows if row_key(r) != row_key(row)] + [row])
            store.write_text(json.dumps(rows, indent=1) + "\n")
            render(rows, Path(args.out))

        measure(names, args.heads, args.tasks, args.seed, args.open_set, on_row=keep)
    render(rows, Path(args.out))


if __name__ == "__main__":
    main()
