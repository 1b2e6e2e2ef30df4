"""``fewshot report``: how well the support-set report (:mod:`fewshot.models.report`) measures, on seeded tasks.

1. **Fit** the model's estimate map (:class:`~fewshot.models.report.EstimateMap`) on ``--fit-tasks`` validation
   tasks (the validation split, seed ``seed + 1``) and the mislabel threshold that flags 2% of their clean images,
   unless ``--card`` uses the card's; ``--write-card`` stores them in the card's ``report`` block (what the server uses).
2. **Measure** on ``--tasks`` test tasks (``--ways``-way ``--shots``-shot, 15 queries per class, seed ``--seed``),
   per task, the report of the clean support set against the task's accuracy on its own queries: mean absolute
   difference (points) and correlation, next to two references on the same tasks (the constant estimate: the
   mean accuracy of the validation tasks; the held-out 0/1 accuracy itself), and how often the 95% interval
   holds the task's accuracy; whether a clean task gets a duplicate flag.
3. **Plant** in copies of the same tasks: one support label changed to another class (the mislabel score's AUROC,
   changed image against clean images, and the recall and clean flag rate at the shipped threshold); an exact
   duplicate and a JPEG quality-90 re-encoded duplicate, each replacing a support image (found or not).

With ``--unlabeled U``, every task (validation and test) also has ``U`` unlabeled images per class, drawn beside
its 15 scored queries and never scored: the report reads them (its estimate's confidence term and the mislabel
score's soft members), and the settings fitted are the card's ``by_shots_unlabeled`` / ``mislabel_gain_unlabeled``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fewshot.models.data import ImageSet, load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import Family
from fewshot.models.openset import auroc
from fewshot.models.report import (
    EstimateMap,
    ReportSettings,
    Unlabeled,
    adapt_with_report,
    build_report,
    mislabel_evidence,
    pixel_duplicates,
)

#: Share of clean validation images the fitted mislabel threshold flags.
CLEAN_FLAGGED = 0.02

QUERIES = 15


def jpeg90(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8 -> the same image encoded as JPEG at quality 90 and decoded again."""
    squeeze = image.shape[-1] == 1
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if squeeze else image).save(buf, format="JPEG", quality=90)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return out[..., None] if squeeze else out


def _task(
    data: ImageSet, sampler: EpisodeSampler, i: int, ways: int
) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """``(support pixels, labels, scored query pixels, their labels, unlabeled pixels)``: the first :data:`QUERIES`
    query images of each class are scored, the rest (``--unlabeled``) are the unlabeled images."""
    ep = sampler.episode(i)
    query, qlabels = np.asarray(ep.query), np.asarray(ep.query_labels)
    scored = np.sort(np.concatenate([np.flatnonzero(qlabels == c)[:QUERIES] for c in range(ways)]))  # in the sampled order
    rest = np.setdiff1d(np.arange(len(query)), scored)
    return (
        data.images[ep.support],
        torch.as_tensor(ep.support_labels),
        data.images[query[scored]],
        qlabels[scored],
        data.images[query[rest]],
    )


def _sampler(data: ImageSet, ways: int, shots: int, unlabeled: int, seed: int) -> EpisodeSampler:
    return EpisodeSampler(data, ways, shots, QUERIES + unlabeled, seed)


def _accuracy(task: Any, family: Family, query: np.ndarray, labels: np.ndarray) -> float:
    return float((task.classify(family.spec.normalize(query)).argmax(1).numpy() == labels).mean())


def fit_settings(
    family: Family, method: str, data: ImageSet, ways: int, shots: int, tasks: int, seed: int, progress: bool, unlabeled: int = 0
) -> tuple[ReportSettings, float]:
    """``(settings, mean accuracy)`` from ``tasks`` tasks of ``data`` (the validation split): the estimate map by
    least squares, the mislabel threshold that flags :data:`CLEAN_FLAGGED` of the (clean) support images; with
    ``unlabeled`` images per class, both for reports given them."""
    adapter = family.adapter(method, shots=shots)
    sampler = _sampler(data, ways, shots, unlabeled, seed)
    p_true, loo, accuracy, scores, confidence = [], [], [], [], []
    kind = ReportSettings(standardize=bool(unlabeled))  # the score the threshold will be on
    for i in tqdm(range(tasks), desc="fit", disable=not progress, leave=False):
        support, labels, query, qlabels, extra = _task(data, sampler, i, ways)
        x = family.spec.normalize(support)
        task, _, held, embeddings = adapter.adapt_reported(x, labels)
        seen = Unlabeled.of(task, family.spec.normalize(extra)) if unlabeled else None
        report = build_report(held, labels, unlabeled=seen)
        scores.extend(mislabel_evidence(embeddings, labels, kind, None if seen is None else seen.embeddings)[0].tolist())
        if report.p_true is None:
            continue
        p_true.append(report.p_true)
        loo.append(report.loo_accuracy)
        confidence.append(report.confidence)
        accuracy.append(_accuracy(task, family, query, qlabels))
    gain = max(0.0, float(np.nanquantile(np.asarray(scores), 1.0 - CLEAN_FLAGGED)))  # never flag an image whose relabelling fits worse
    mapping = EstimateMap.fit(p_true, loo, accuracy, confidence if unlabeled else None)
    fitted = ReportSettings(mapping, gain, standardize=bool(unlabeled))
    return (ReportSettings(unlabeled=fitted) if unlabeled else fitted), float(np.mean(accuracy))


def measure(
    family: Family,
    method: str,
    data: ImageSet,
    ways: int,
    shots: int,
    tasks: int,
    seed: int,
    settings: ReportSettings,
    constant: float,
    progress: bool = False,
    unlabeled: int = 0,
) -> dict[str, Any]:
    """The figures of one model and method on ``tasks`` test tasks (module docstring), as a JSON-able dict."""
    adapter = family.adapter(method, shots=shots)
    sampler = _sampler(data, ways, shots, unlabeled, seed)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {k: [] for k in ("accuracy", "estimate", "low", "high", "loo", "p_true")}
    swapped, clean, false_dups, found_exact, found_near = [], [], 0, 0, 0
    swapped_flagged, clean_flagged = [], []
    used = settings.unlabeled if unlabeled and settings.unlabeled is not None else settings
    adapt_seconds, report_seconds = [], []
    start = time.perf_counter()
    for i in tqdm(range(tasks), desc=f"{family.name} {method}", disable=not progress, leave=False):
        support, labels, query, qlabels, extra = _task(data, sampler, i, ways)
        x = family.spec.normalize(support)
        xu = family.spec.normalize(extra) if unlabeled else None
        t0 = time.perf_counter()
        adapter.adapt(x, labels)
        t1 = time.perf_counter()
        task, _, report = adapt_with_report(adapter, x, labels, support, settings, xu)
        adapt_seconds.append(t1 - t0)
        report_seconds.append(time.perf_counter() - t1)
        rows["accuracy"].append(_accuracy(task, family, query, qlabels))
        for key in ("estimate", "low", "high"):
            rows[key].append(getattr(report, key) / 100.0)
        rows["loo"].append(report.loo_accuracy)
        rows["p_true"].append(report.p_true)
        false_dups += any(f.kind in ("duplicate", "near_duplicate") for f in report.flags)
        # one label changed: the changed image's score against the clean images' (the same task's embeddings
        # are those of the task adapted on the changed labels, as the server would see them)
        j = int(rng.integers(len(labels)))
        changed = labels.clone()
        changed[j] = (labels[j] + int(rng.integers(1, ways))) % ways
        planted_task = adapter.adapt(x, changed)
        scores, flagged, _ = mislabel_evidence(planted_task.embed(x), changed, used, None if xu is None else planted_task.embed(xu))
        s, f = scores.numpy(), flagged.numpy()
        swapped.append(float(s[j]))
        clean.extend(np.delete(s, j).tolist())
        swapped_flagged.append(bool(f[j]))
        clean_flagged.extend(np.delete(f, j).tolist())
        # duplicates: the last image of class 0 becomes a copy of its first, the last of class 1 a JPEG copy of its first
        planted = support.copy()
        firsts = [int(np.flatnonzero(labels.numpy() == c)[0]) for c in (0, 1)]
        lasts = [int(np.flatnonzero(labels.numpy() == c)[-1]) for c in (0, 1)]
        planted[lasts[0]] = support[firsts[0]]
        planted[lasts[1]] = jpeg90(support[firsts[1]])
        flagged = {(f.index, f.kind, f.other) for f in pixel_duplicates(planted, labels)}  # the report's duplicate flags
        found_exact += (lasts[0], "duplicate", firsts[0]) in flagged
        found_near += any(f[0] == lasts[1] and f[1] in ("duplicate", "near_duplicate") and f[2] == firsts[1] for f in flagged)
    acc = np.asarray(rows["accuracy"])
    est = np.asarray(rows["estimate"])
    loo = np.asarray(rows["loo"])
    sw, cl = np.asarray(swapped), np.asarray(clean)
    threshold = used.mislabel_gain
    inside = (np.asarray(rows["low"]) <= acc) & (acc <= np.asarray(rows["high"]))
    mad = lambda e: float(100.0 * np.abs(acc - e).mean())  # noqa: E731  (a one-line local helper)
    corr = lambda e: float(np.corrcoef(acc, e)[0, 1]) if np.std(e) > 0 else float("nan")  # noqa: E731
    return {
        "model": family.name,
        "method": method,
        "ways": ways,
        "shots": shots,
        "unlabeled": unlabeled,
        "tasks": tasks,
        "seed": seed,
        "accuracy": float(100.0 * acc.mean()),
        "estimate": {
            "mad": mad(est),
            "corr": corr(est),
            "interval_coverage": float(100.0 * inside.mean()),
            "map": used.mapping.to_dict(),
        },
        "constant": {"mad": mad(np.full_like(acc, constant)), "value": 100.0 * constant},
        "loo_01": {"mad": mad(loo), "corr": corr(loo)},
        "mislabel": {
            "auroc": auroc(sw, cl),
            "threshold": threshold,
            "score": "standardized gain" if used.standardize else "gain",
            "recall": float(100.0 * np.mean(swapped_flagged)),
            "clean_flagged": float(100.0 * np.mean(clean_flagged)),
        },
        "duplicates": {"exact_found": float(100.0 * found_exact / tasks), "jpeg90_found": float(100.0 * found_near / tasks)},
        "clean_tasks_with_a_duplicate_flag": false_dups,
        "adapt_seconds_median": float(np.median(adapt_seconds)),
        "report_seconds_median": float(np.median(report_seconds)),
        "seconds": time.perf_counter() - start,
    }


def run(
    family: Family,
    method: str,
    dataset: str,
    ways: int,
    shots: int,
    tasks: int,
    seed: int,
    fit_tasks: int,
    card_settings: bool,
    data_root: str | None = None,
    progress: bool = False,
    unlabeled: int = 0,
) -> tuple[dict[str, Any], ReportSettings]:
    """Fit the settings on validation tasks (or, ``card_settings``, use the card's), then :func:`measure`:
    ``(figures, settings)``; ``unlabeled`` images per class beside each task's scored queries."""
    val = load_dataset(dataset, "val", root=data_root, spec=family.spec)
    settings, constant = fit_settings(family, method, val, ways, shots, fit_tasks, seed + 1, progress, unlabeled)
    if card_settings:
        settings = family.report_settings(method, shots)
    test = load_dataset(dataset, "test", root=data_root, spec=family.spec)
    figures = measure(family, method, test, ways, shots, tasks, seed, settings, constant, progress, unlabeled)
    figures["dataset"] = dataset
    figures["fit_tasks"] = fit_tasks
    return figures, settings


def write_settings(card_path: Path, method: str, shots: int, settings: ReportSettings) -> None:
    """Store ``settings`` in the card's ``report.methods[method]`` (the map under ``by_shots[shots]``; settings fitted
    with unlabeled images, ``settings.unlabeled``, under ``by_shots_unlabeled`` and ``mislabel_gain_unlabeled``)."""
    card = json.loads(card_path.read_text())
    block = card.setdefault("report", {}).setdefault("methods", {}).setdefault(method, {})
    if settings.unlabeled is not None:
        block.setdefault("by_shots_unlabeled", {})[str(shots)] = settings.unlabeled.mapping.to_dict()
        block["mislabel_gain_unlabeled"] = settings.unlabeled.mislabel_gain
    else:
        block.setdefault("by_shots", {})[str(shots)] = settings.mapping.to_dict()
        block["mislabel_gain"] = settings.mislabel_gain
    card_path.write_text(json.dumps(card, indent=2) + "\n")


START, END = "<!-- report_check.py: start -->", "<!-- report_check.py: end -->"


def render_markdown(rows: list[dict[str, Any]], moves: list[dict[str, Any]], path: Path) -> None:
    """RESULTS.md's "Support-set report" block (between :data:`START` and :data:`END`) from ``fewshot report --json``
    rows and ``scripts/task_moves_check.py`` lines."""
    tasks = sorted({r["tasks"] for r in rows})
    lines = [
        START,
        "## Support-set report",
        "",
        f"The support-set report (`models/report.py`, docs/serving.md) on {'/'.join(map(str, tasks))} seeded 5-way 5-shot test "
        "tasks per row (seed 0, 15 queries per class), each method with the estimate map and mislabel threshold fitted on "
        f"{rows[0]['fit_tasks']} validation tasks (seed 1) and written into its card: `scripts/report-shipped.sh`, one",
        "`fewshot report --model M --method X --ways 5 --shots 5 --tasks 600 --fit-tasks 300 --seed 0 --write-card --json`",
        "per row. **Estimate**: mean absolute difference (points) between the estimate and the task's accuracy on its own",
        "75 queries, their correlation, and how often the 95% interval held that accuracy; next to the constant estimate",
        "(the mean accuracy of the validation tasks) and the held-out 0/1 accuracy itself, on the same tasks.",
        "**Mislabel**: one support label per task changed to another class; AUROC of the mislabel score (the changed",
        "image against the task's 24 clean ones), and at the fitted threshold the share of changed images flagged and",
        "of clean images flagged. **Duplicates**: an exact copy and a JPEG quality-90 copy of a support image each",
        "replacing another image of its class: the share of tasks where each is flagged as a copy of the right image, and",
        "the clean tasks with any duplicate flag. **Cost**: median seconds of Adapt with the report over plain Adapt, in",
        "process on one thread.",
        "",
        *_table(rows),
    ]
    if moves:
        models = [x for x in moves if "model" in x]
        lines += [
            "",
            "### Moving tasks (ExportTask, ImportTask)",
            "",
            f"`.venv/bin/python scripts/task_moves_check.py --tasks {models[0]['tasks']} --seed {models[0]['seed']}`: every shipped",
            "model's seeded 5-way 5-shot test tasks adapted on a `fewshot serve` with a SQLite store, exported, imported into",
            "one with a PostgreSQL store (a real server), and classified on both (75 queries each): tasks whose labels and",
            "every probability are identical, and the largest absolute difference.",
            "",
            "| model | tasks | identical | largest difference |",
            "|---|---|---|---|",
            *[f"| {x['model']} | {x['tasks']} | {x['identical']} | {x['max_abs_diff']:.3g} |" for x in models],
            "",
            "Bad blobs, refused on the PostgreSQL-backed server:",
            "",
            *[f"- {what}: `{answer}`" for x in moves if "refusals" in x for what, answer in x["refusals"].items()],
        ]
    lines.append(END)
    _splice(path, START, END, lines)


def _table(rows: list[dict[str, Any]], duplicates: bool = True) -> list[str]:
    """``fewshot report --json`` rows as a Markdown table (header included); ``duplicates``: with the planted-copy
    columns (the unlabeled block leaves them out: the copies are found from pixels, whatever else the task has)."""
    copies = ["exact / JPEG copies found", "clean tasks flagged"] if duplicates else []
    head = ["model", "method", "accuracy", "estimate MAD", "corr", "interval holds", "constant MAD", "held-out 0/1 MAD / corr",
            "mislabel AUROC", "recall / clean flagged", *copies, "cost"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e, m, d = r["estimate"], r["mislabel"], r["duplicates"]
        cells = [r["model"], r["method"], f"{r['accuracy']:.2f}", f"{e['mad']:.2f}", f"{e['corr']:.3f}", f"{e['interval_coverage']:.1f}%",
                 f"{r['constant']['mad']:.2f}", f"{r['loo_01']['mad']:.2f} / {r['loo_01']['corr']:.3f}", f"{m['auroc']:.4f}",
                 f"{m['recall']:.1f}% / {m['clean_flagged']:.2f}%"]  # fmt: skip
        if duplicates:
            cells += [f"{d['exact_found']:.1f}% / {d['jpeg90_found']:.1f}%", f"{r['clean_tasks_with_a_duplicate_flag']} of {r['tasks']}"]
        cells.append(f"{r['report_seconds_median'] / r['adapt_seconds_median']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


START_MAML, END_MAML = "<!-- report_check.py maml: start -->", "<!-- report_check.py maml: end -->"


def render_maml(rows: list[dict[str, Any]], path: Path) -> None:
    """RESULTS.md's "The MAML models" block (between :data:`START_MAML` and :data:`END_MAML`, appended at the end the
    first time) from the ``fewshot report --json`` rows of the shipped MAML models (support set alone)."""
    if not rows:
        return
    lines = [
        START_MAML,
        "### The MAML models (`fewshot report`, support set alone)",
        "",
        "The shipped MAML inner-loop models, measured as the rows of the main table (the same columns, tasks and seeds; the",
        "same 2-fold held-out adaptation as CxGrad), their settings fitted on validation tasks and written into their cards:",
        "`scripts/report-shipped.sh` runs them after the unlabeled rows, into `runs/report/maml.jsonl`.",
        "",
        *_table(rows),
        END_MAML,
    ]
    _splice(path, START_MAML, END_MAML, lines)


def _splice(path: Path, start: str, end: str, lines: list[str]) -> None:
    """Replace the block of ``path`` from ``start`` to ``end`` (markers included in ``lines``) by ``lines``, or
    append it the first time."""
    text = path.read_text()
    if start in text:
        text = text[: text.index(start)] + "\n".join(lines) + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)


START_UNLABELED, END_UNLABELED = "<!-- report_check.py unlabeled: start -->", "<!-- report_check.py unlabeled: end -->"


def render_unlabeled(rows: list[dict[str, Any]], path: Path) -> None:
    """RESULTS.md's "With unlabeled images" block (between :data:`START_UNLABELED` and :data:`END_UNLABELED`, appended
    at the end the first time) from ``fewshot report --unlabeled U --json`` rows."""
    if not rows:
        return
    u = rows[0]["unlabeled"]
    lines = [
        START_UNLABELED,
        "### With unlabeled images (`fewshot report --unlabeled`)",
        "",
        f"The Tiny ImageNet rows again, each task now with {u} unlabeled images per class beside its 15 scored queries (drawn from",
        "the same classes, never scored), sent with the support set as an Adapt's `unlabeled` images: the report's",
        "estimate reads the task's mean highest probability on them (a map fitted with them, the card's",
        "`by_shots_unlabeled`) and the mislabel score holds them as soft members of the class means (its own threshold,",
        f"`mislabel_gain_unlabeled`). Fitted on {rows[0]['fit_tasks']} validation tasks (seed 1), measured on 600 seeded test",
        f"tasks (seed 0; not the tasks of the table above: each draws {QUERIES + u} query images a class). Cost: Adapt with the report",
        f"and its {5 * u} unlabeled images over plain Adapt (the held-out predictions, one feature pass over them), one",
        f"`fewshot report --model M --method X --ways 5 --shots 5 --tasks 600 --fit-tasks 300 --seed 0 --unlabeled {u} --write-card --json`",
        "per row (`scripts/report-shipped.sh` runs them after the rows above). Omniglot has 20 images a class, none left",
        "after 5 shots and 15 queries.",
        "",
        *_table(rows, duplicates=False),
        END_UNLABELED,
    ]
    _splice(path, START_UNLABELED, END_UNLABELED, lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="render RESULTS.md's support-set report block from the measured JSON lines")
    parser.add_argument("--report", type=Path, default=Path("runs/report/report.jsonl"))
    parser.add_argument("--moves", type=Path, default=Path("runs/moves/task_moves.jsonl"))
    parser.add_argument("--unlabeled", type=Path, default=Path("runs/report/unlabeled.jsonl"))
    parser.add_argument("--maml", type=Path, default=Path("runs/report/maml.jsonl"))
    parser.add_argument("--results", type=Path, default=Path("RESULTS.md"))
    ns = parser.parse_args()
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []  # noqa: E731
    if ns.report.exists():  # the block is rendered from every row: only where they were measured here
        render_markdown(read(ns.report), read(ns.moves), ns.results)
    render_unlabeled(read(ns.unlabeled), ns.results)
    render_maml(read(ns.maml), ns.results)
