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
from fewshot.models.zoo import ZOO_DIR, accuracy_key, load_model, save_card

SETTINGS = {"omniglot": [(5, 1), (5, 5), (20, 1), (20, 5)], "tinyimagenet": [(5, 1), (5, 5)]}
HEADS = ("centroid", "laplacianshot")
ORDER = ["omniglot-conv4-directsum", "tinyimagenet-conv4-sce", "tinyimagenet-conv4-sce-nca-sum",
         "tinyimagenet-conv4-sce-nca-directsum", "omniglot-conv4-maml", "omniglot-conv4-cxgrad", "tinyimagenet-conv4-maml",
         "tinyimagenet-conv4-cxgrad"]


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
        if model.card["family"] == "metric":
            runs = [(w, s, head, []) for w, s in SETTINGS[dataset] for head in HEADS]
        else:  # the setting it was meta-trained for, both BatchNorm modes
            cfg = model.card["training"]["config"]
            runs = [(cfg["ways"], cfg["shots"], model.card["method"], ["--bn", bn]) for bn in ("support", "transductive")]
        for ways, shots, head, extra in runs:
            cli = ["--model", name, "--dataset", dataset, "--ways", str(ways), "--shots", str(shots), "--queries", "15",
                   "--tasks", str(args.tasks), "--head", head, *extra, "--seed", str(args.seed)]
            row = run_eval(cli)
            row["command"] = "fewshot eval " + " ".join(cli) + " --json"
            rows.append(row)
            key = accuracy_key(ways, shots, head, row.get("bn"))
            accuracy[key] = {k: row[k] for k in ("accuracy", "ci95", "tasks", "seed")}
            print(f"{name:40s} {ways:2d}-way {shots}-shot {head:14s} {row.get('bn', ''):12s} {row['accuracy']:6.2f} "
                  f"+- {row['ci95']:.2f}", file=sys.stderr)
        model.card["accuracy"] = {"split": "test", "queries": 15, **accuracy}
        save_card(model.path, model.card)
    # Rows of models not re-measured this time are kept from results.json (same file, same commands).
    store = Path(args.out).with_name("results.json")
    kept = [r for r in (json.loads(store.read_text()) if store.exists() else []) if r["model"] not in names]
    rows = sorted(kept + rows, key=lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else 99, r["ways"], r["shots"]))
    store.write_text(json.dumps(rows, indent=1) + "\n")
    write_markdown(rows, Path(args.out), args.tasks, args.seed)


START, END = "<!-- results.py: start -->", "<!-- results.py: end -->"


def write_markdown(rows: list[dict], path: Path, tasks: int, seed: int) -> None:
    """Replace the generated block of ``path`` (between START and END), keeping the prose around it."""
    lines = [
        START,
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
    for r in (r for r in rows if "bn" not in r):
        head = r["head"] + (f" (lambda={r['lambda']}, {'rectified' if r['rectify'] else 'plain'})" if r["head"] == "laplacianshot" else "")
        lines.append(f"| {r['model']} | {r['dataset']} | {r['ways']}-way {r['shots']}-shot | {head}, {r['transform']} | "
                     f"{r['accuracy']:.2f} | {r['ci95']:.2f} | `{r['command']}` |")
    inner = [r for r in rows if "bn" in r]
    if inner:
        lines += ["", "## Gradient path (meta-trained inner loops)", "",
                  "`support`: BatchNorm statistics of the support set, frozen after adaptation (batch-invariant, what the "
                  "server uses); `transductive`: each query batch normalised with its own statistics (the papers' protocol).",
                  "", "| model | dataset | setting | method | BatchNorm | accuracy | 95% CI | command |", "|---|---|---|---|---|---|---|---|"]
        for r in inner:
            lines.append(f"| {r['model']} | {r['dataset']} | {r['ways']}-way {r['shots']}-shot | {r['method']} | {r['bn']} | "
                         f"{r['accuracy']:.2f} | {r['ci95']:.2f} | `{r['command']}` |")
    lines.append(END)
    block = "\n".join(lines)
    old = path.read_text() if path.exists() else "# Results\n\n" + START + END + "\n"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
