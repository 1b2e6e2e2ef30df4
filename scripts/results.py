"""Measure every shipped model x head x setting on 600 seeded test tasks and write RESULTS.md.

Each row is exactly ``fewshot eval ... --json`` (the command is printed in the table); the measured
accuracy is also stored in the model's card. Usage: ``python scripts/results.py [--tasks 600]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from fewshot.cli import main as fewshot_main
from fewshot.models.zoo import ZOO_DIR, load_model, save_card

SETTINGS = {"omniglot": [(5, 1), (5, 5), (20, 1), (20, 5)], "tinyimagenet": [(5, 1), (5, 5)]}
HEADS = ("centroid", "laplacianshot")
ORDER = ["omniglot-conv4-directsum", "tinyimagenet-conv4-sce", "tinyimagenet-conv4-sce-nca-sum",
         "tinyimagenet-conv4-sce-nca-directsum"]


def run_eval(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fewshot_main(["eval", *args, "--json"])
    if code:
        raise SystemExit(f"fewshot eval {' '.join(args)} failed")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="RESULTS.md")
    parser.add_argument("--models", nargs="*", help="default: every shipped metric model")
    args = parser.parse_args()
    names = args.models or [n for n in ORDER if (ZOO_DIR / n / "card.json").exists()]
    rows = []
    for name in names:
        model = load_model(name)
        dataset = model.card["data"]["dataset"]
        accuracy = {}
        for ways, shots in SETTINGS[dataset]:
            for head in HEADS:
                cli = ["--model", name, "--dataset", dataset, "--ways", str(ways), "--shots", str(shots), "--queries", "15",
                       "--tasks", str(args.tasks), "--head", head, "--seed", str(args.seed)]
                row = run_eval(cli)
                row["command"] = "fewshot eval " + " ".join(cli) + " --json"
                rows.append(row)
                accuracy[f"{ways}way_{shots}shot_{head}"] = {k: row[k] for k in ("accuracy", "ci95", "tasks", "seed")}
                print(f"{name:40s} {ways:2d}-way {shots}-shot {head:14s} {row['accuracy']:6.2f} +- {row['ci95']:.2f}",
                      file=sys.stderr)
        model.card["accuracy"] = {"split": "test", "queries": 15, **accuracy}
        save_card(model.path, model.card)
    write_markdown(rows, Path(args.out), args.tasks, args.seed)


def write_markdown(rows: list[dict], path: Path, tasks: int, seed: int) -> None:
    lines = [
        "# Results",
        "",
        f"Few-shot accuracy (%) of the shipped models on {tasks} seeded test tasks (seed {seed}, 15 queries per class),",
        "mean and 95% confidence interval 1.96*std/sqrt(T) over per-task accuracies. The same seed gives the same",
        "tasks for every model and head, so rows of one dataset and setting are paired comparisons.",
        "Regenerate everything with `make results` (`python scripts/results.py`); each row's command reproduces it alone.",
        "",
        "## Metric path (direct-sum training, nearest centroid and LaplacianShot)",
        "",
        "| model | dataset | setting | head | accuracy | 95% CI | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = r["head"] + (f" (lambda={r['lambda']}, {'rectified' if r['rectify'] else 'plain'})" if r["head"] == "laplacianshot" else "")
        lines.append(f"| {r['model']} | {r['dataset']} | {r['ways']}-way {r['shots']}-shot | {head}, {r['transform']} | "
                     f"{r['accuracy']:.2f} | {r['ci95']:.2f} | `{r['command']}` |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
