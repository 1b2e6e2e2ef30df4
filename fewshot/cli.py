"""The ``fewshot`` command: ``train``, ``eval``, ``package`` (and later ``export``, ``serve``, ``bench``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from fewshot.errors import ConfigError, FewShotError, one_line


def _train_configs():
    from fewshot.models.inner_loop.training import MetaTrainConfig
    from fewshot.models.training import TrainConfig

    return TrainConfig, MetaTrainConfig


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a backbone: supervised (--loss/--metric/--combine) or meta-trained (--method)",
        description="--dataset omniglot, tinyimagenet or folder:PATH (your own images, one subfolder "
        "per class; --image-size, --channels). "
        "Without --method: supervised training with the direct-sum paper's losses. "
        "With --method maml|fomaml|metasgd|mamlpp|maml-lslr|boil|metacurvature|metalstm|cxgrad|cxgrad-task: "
        "episodic meta-training of that inner loop.",
    )
    seen: dict[str, object] = {}
    for cls in _train_configs():
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            default = getattr(cls(), f.name)
            seen[f.name] = default
            flag = "--" + f.name.replace("_", "-")
            if isinstance(default, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
            else:
                kind = {int: int, float: float}.get(type(default), str)
                p.add_argument(flag, type=kind, default=None, help=f"default {default}")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _run_train(args: argparse.Namespace) -> None:
    supervised_cls, meta_cls = _train_configs()
    cls = meta_cls if args.method else supervised_cls
    names = {f.name for f in dataclasses.fields(cls)}
    other = {f.name for f in dataclasses.fields(meta_cls if cls is supervised_cls else supervised_cls)} - names
    stray = sorted("--" + n.replace("_", "-") for n in other if getattr(args, n) is not None)
    if stray:
        mode = "meta-training (--method)" if args.method else "supervised training (no --method)"
        raise ConfigError(f"{', '.join(stray)} do not apply to {mode}")
    cfg = cls(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    if args.method:
        from fewshot.models.inner_loop.training import train_meta

        best = train_meta(cfg, Path(args.out), resume=args.resume, device=args.device)
    else:
        from fewshot.models.training import train_supervised

        best = train_supervised(cfg, Path(args.out), resume=args.resume, device=args.device)
    print(f"best checkpoint: {best}")


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "average",
        help="average the weights of a meta-training run's last snapshots; keep if better on validation",
        description="Averages the meta-parameters (and learned update rule) of "
        "OUT/snapshots/ITER.pt for ITER >= --from-iteration, validates on the run's validation "
        "tasks and makes it OUT/best.pt only if it beats the best single checkpoint "
        "(kept as best-single.pt).",
    )
    p.add_argument("--run", required=True, help="meta-training run folder")
    p.add_argument("--from-iteration", type=int, required=True, help="first snapshot iteration to average")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _run_average(args: argparse.Namespace) -> None:
    from fewshot.models.inner_loop.averaging import average_run

    run = Path(args.run)
    if not (run / "best.pt").exists():
        raise ConfigError(f"{run} is not a meta-training run folder (no best.pt)")
    res = average_run(run, args.from_iteration, args.device)
    print(
        f"average of {len(res.iterations)} snapshots ({res.iterations[0]}..{res.iterations[-1]}): val "
        f"{res.accuracy:.2f} +- {res.ci95:.2f} vs best single {res.best_single:.2f}: "
        f"{'kept as best.pt' if res.kept else 'not kept'}"
    )


def _setting(text: str) -> tuple[str, float | str]:
    """``NAME=VALUE`` -> ``(name, value)``: a number when VALUE reads as one, else the text (a choice)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        return name, value


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="few-shot accuracy of a shipped model on seeded test tasks")
    p.add_argument("--model", required=True, help="shipped model name (models/zoo) or a model folder")
    p.add_argument(
        "--dataset",
        help="omniglot, tinyimagenet or folder:PATH (your own images, one subfolder per class, "
        "split as `fewshot train` splits them; any model, at its input size); default: the model's training dataset",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument(
        "--head", help="metric models: centroid, laplacianshot, logreg (the heads its card has); default: the model's own method"
    )
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        metavar="NAME=VALUE",
        default=[],
        help="a per-request setting of the method, as the server takes it (repeatable; e.g. inner_steps=10, "
        "bn=transductive, lambda=0.5, transform=L2N); the model's settings and their bounds are listed "
        "when one is wrong, and by `fewshot-client models`",
    )
    p.add_argument(
        "--inner-precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="what the inner loop computes in (as `fewshot serve --inner-precision`)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-root", help="default: $FEWSHOT_DATA or ../shared/data")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--predictions", help="write every task's predicted query classes to this JSON file")
    p.add_argument(
        "--open-set",
        action="store_true",
        help="open-set protocol: each task's queries also hold --queries "
        "images of each of --ways unseen test classes; reports closed-set accuracy, the AUROC of the "
        "method's calibrated score (known vs unknown), known acceptance and unknown rejection at the "
        "calibrated threshold, and the ECE before and after temperature scaling",
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar")


def eval_row(args: argparse.Namespace) -> dict:
    """Run ``fewshot eval`` with parsed ``args``; returns its JSON row. The model is its family's object
    (:func:`~fewshot.models.family.open_shipped`), the one the server builds from a bundle."""
    import torch

    from fewshot.models.data import load_dataset
    from fewshot.models.evaluation import evaluate
    from fewshot.models.family import open_shipped
    from fewshot.models.folders import canonical, is_folder
    from fewshot.models.zoo import load_model

    shipped = load_model(args.model)
    dataset = canonical(args.dataset) if args.dataset else shipped.card.dataset
    if dataset != shipped.card.dataset and not is_folder(dataset):
        raise ConfigError(f"model {shipped.name} takes {shipped.card.dataset} inputs, not {dataset}")
    model = open_shipped(shipped, args.backend, args.device)
    model.adapt_in(getattr(torch, getattr(args, "inner_precision", "float32")))
    method = model.resolve_method(args.head)
    settings = model.check_settings(method, dict(getattr(args, "set", [])))
    adapter = model.adapter(method, shots=args.shots, **settings)
    data = load_dataset(dataset, args.split, args.data_root, spec=shipped.spec)  # a folder: at the model's input size
    if getattr(args, "open_set", False):
        from fewshot.models.openset import evaluate_open_set

        if getattr(args, "predictions", None):
            raise ConfigError("--predictions is for closed-set runs; drop it or --open-set")
        res = evaluate_open_set(
            adapter,
            data,
            lambda idx: model.spec.normalize(data.images[idx]),
            args.ways,
            args.shots,
            args.queries,
            args.tasks,
            args.seed,
            progress=args.progress,
        )
        r2 = lambda v: None if v is None or v != v else round(v, 2)  # noqa: E731  (NaN: no threshold)
        return {
            "model": model.name,
            "dataset": dataset,
            "split": args.split,
            "ways": args.ways,
            "shots": args.shots,
            "queries": args.queries,
            "head": args.head or method,
            **model.describe(adapter),
            "tasks": res.tasks,
            "seed": args.seed,
            "open_set": True,
            "accuracy": r2(res.accuracy),
            "ci95": r2(res.accuracy_ci95),
            "auroc": r2(res.auroc),
            "auroc_ci95": r2(res.auroc_ci95),
            "score": res.score,
            "temperature": round(res.temperature, 4),
            "threshold": res.threshold,
            "acceptance": r2(res.acceptance),
            "acceptance_ci95": r2(res.acceptance_ci95),
            "rejection": r2(res.rejection),
            "rejection_ci95": r2(res.rejection_ci95),
            "ece_before": r2(res.ece_before),
            "ece_after": r2(res.ece_after),
            "seconds": r2(res.seconds),
        }
    res = evaluate(adapter, data, model.spec.normalize, args.ways, args.shots, args.queries, args.tasks, args.seed, progress=args.progress)
    if getattr(args, "predictions", None):
        Path(args.predictions).write_text(
            json.dumps({"seed": args.seed, "ways": args.ways, "shots": args.shots, "queries": args.queries, "predictions": res.predictions})
        )
    return {
        "model": model.name,
        "dataset": dataset,
        "split": args.split,
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "head": args.head or method,
        **model.describe(adapter),
        "tasks": res.tasks,
        "seed": args.seed,
        "accuracy": round(res.accuracy, 2),
        "ci95": round(res.ci95, 2),
        "seconds": round(res.seconds, 2),
    }


def _describe(row: dict) -> str:
    open_set = ""
    if row.get("open_set"):
        open_set = f", open-set AUROC {row['auroc']:.2f} +- {row['auroc_ci95']:.2f} ({row['score']})"
        if row.get("acceptance") is not None:
            open_set += (
                f", at the calibrated threshold known accepted {row['acceptance']:.2f} +- {row['acceptance_ci95']:.2f} %, "
                f"unknown rejected {row['rejection']:.2f} +- {row['rejection_ci95']:.2f} %"
            )
        open_set += f", ECE {row['ece_before']:.2f} -> {row['ece_after']:.2f} (T={row['temperature']:g})"
    return (
        f"{row['model']} {row['dataset']}/{row['split']} {row['ways']}-way {row['shots']}-shot {row['head']}: "
        f"{row['accuracy']:.2f} +- {row['ci95']:.2f} %{open_set} over {row['tasks']} tasks (seed {row['seed']}, "
        f"{row['seconds']:.1f} s)"
    )


def _run_eval(args: argparse.Namespace) -> None:
    row = eval_row(args)
    print(json.dumps(row) if args.json else _describe(row))


def _add_package(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("package", help="turn a training run into a shipped model (centering vector, tuned heads)")
    p.add_argument("--run", required=True, help="training run folder (uses its best.pt; supervised or meta-trained)")
    p.add_argument("--name", required=True)
    p.add_argument("--train-command", default="", help="the training command, recorded in the model card")
    p.add_argument("--out", default=None, help="default: models/zoo")
    p.add_argument("--tune-tasks", type=int, default=500, help="validation tasks for choosing head settings (metric models)")
    p.add_argument("--calibration-tasks", type=int, default=300, help="open-set validation tasks per method and shot count")


def _run_package(args: argparse.Namespace) -> None:
    import torch

    from fewshot.models.packaging import package_meta_run, package_run
    from fewshot.models.zoo import ZOO_DIR

    best = Path(args.run) / "best.pt"
    if not best.exists():
        raise FileNotFoundError(f"{best} not found: is {args.run} a training run folder?")
    out = Path(args.out) if args.out else ZOO_DIR
    if "meta" in torch.load(best, map_location="cpu", weights_only=False):
        path = package_meta_run(best, args.name, args.train_command, out, calibration_tasks=args.calibration_tasks)
    else:
        path = package_run(best, args.name, args.train_command, out, args.tune_tasks, calibration_tasks=args.calibration_tasks)
    print(f"packaged {args.name} into {path}")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="choose head settings of a shipped metric model on its validation tasks, into its card (e.g. for a newly added head)"
    )
    p.add_argument("--model", required=True, help="shipped metric model name (models/zoo) or a model folder")
    p.add_argument("--head", action="append", required=True, help="head to tune (repeat); see `fewshot eval --head`")
    p.add_argument("--tasks", type=int, help="validation tasks (default: the count its card recorded)")


def _run_tune(args: argparse.Namespace) -> None:
    from fewshot.models.heads import HEADS
    from fewshot.models.packaging import tune_shipped

    unknown = [h for h in args.head if h not in HEADS]
    if unknown:
        raise ConfigError(f"unknown head {', '.join(unknown)}: heads are {', '.join(HEADS)}")
    for key, accuracy in tune_shipped(args.model, args.head, args.tasks).items():
        print(f"{args.model}: validation {key} {accuracy:.2f}")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="open-set calibration of a shipped model on validation episodes with "
        "distractor classes (temperature, score, thresholds per method and shot count), into its card",
    )
    p.add_argument("--model", required=True, help="shipped model name (models/zoo) or a model folder")
    p.add_argument("--method", action="append", help="method to calibrate (repeat; default: every method)")
    p.add_argument("--tasks", type=int, default=300, help="validation episodes per method and shot count")
    p.add_argument("--seed", type=int, help="default: the card's training seed")
    p.add_argument("--data-root", help="default: $FEWSHOT_DATA or ../shared/data")


def _run_calibrate(args: argparse.Namespace) -> None:
    from fewshot.models.packaging import calibrate_shipped

    if args.tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {args.tasks}")
    calibrate_shipped(args.model, args.tasks, args.seed, args.data_root, args.method, log=print)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="measure the support-set report on seeded tasks: the accuracy estimate against each task's own "
        "queries, planted mislabels and duplicates (RESULTS.md); fits the estimate map on validation tasks",
    )
    p.add_argument("--model", required=True, help="shipped model name (models/zoo) or a model folder")
    p.add_argument("--method", help="head or method (default: the model's own)")
    p.add_argument("--dataset", help="default: the model's training dataset")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--tasks", type=int, default=600, help="test tasks (default 600)")
    p.add_argument("--fit-tasks", type=int, default=300, help="validation tasks the estimate map is fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--unlabeled",
        type=int,
        default=0,
        help="unlabeled images per class beside each task's 15 scored queries, read by the report (an Adapt's "
        "`unlabeled` images); the settings fitted are those for reports given them",
    )
    p.add_argument("--card", action="store_true", help="measure with the settings the card holds (not the ones fitted now)")
    p.add_argument("--write-card", action="store_true", help="store the fitted estimate map and mislabel threshold in the model card")
    p.add_argument("--data-root", help="default: $FEWSHOT_DATA or ../shared/data")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the summary")


def _run_report(args: argparse.Namespace) -> None:
    from fewshot.models.family import open_shipped
    from fewshot.models.zoo import load_model, model_dir
    from fewshot.tools.report_check import run, write_settings

    if min(args.tasks, args.fit_tasks) < 2:
        raise ConfigError("--tasks and --fit-tasks must be at least 2")
    if args.shots < 2:
        raise ConfigError("the report estimates accuracy by holding support images out: --shots must be at least 2")
    if args.unlabeled < 0:
        raise ConfigError(f"--unlabeled must be 0 or more images per class, not {args.unlabeled}")
    shipped = load_model(args.model)
    family = open_shipped(shipped, threads=1)
    method = family.resolve_method(args.method)
    dataset = args.dataset or family.manifest["data"]["dataset"]
    figures, settings = run(
        family,
        method,
        dataset,
        args.ways,
        args.shots,
        args.tasks,
        args.seed,
        args.fit_tasks,
        args.card,
        args.data_root,
        not args.json,
        args.unlabeled,
    )
    if args.write_card:
        write_settings(model_dir(args.model) / "card.json", method, args.shots, settings)
    if args.json:
        print(json.dumps(figures))
        return
    e, m, d = figures["estimate"], figures["mislabel"], figures["duplicates"]
    print(
        f"{family.name} {method} {args.ways}-way {args.shots}-shot, {args.tasks} test tasks (seed {args.seed}): accuracy {figures['accuracy']:.1f}%\n"
        f"  estimate: mean |estimate - accuracy| {e['mad']:.2f} points, correlation {e['corr']:.3f}, 95% interval holds it in "
        f"{e['interval_coverage']:.1f}% (constant {figures['constant']['mad']:.2f}, held-out 0/1 {figures['loo_01']['mad']:.2f} / {figures['loo_01']['corr']:.3f})\n"
        f"  mislabel: AUROC {m['auroc']:.4f}, recall {m['recall']:.1f}% with {m['clean_flagged']:.2f}% of clean images flagged (gain > {m['threshold']:.2f})\n"
        f"  duplicates found: exact {d['exact_found']:.1f}%, JPEG q90 {d['jpeg90_found']:.1f}%; clean tasks with a duplicate flag: "
        f"{figures['clean_tasks_with_a_duplicate_flag']}"
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="export missing bundles, start the server, run the client SDK through real test tasks")
    p.add_argument("--tasks", type=int, default=40, help="tasks per row (default 40: minutes; 600: RESULTS.md's tasks, `make demo FULL=1`)")
    p.add_argument("--keep", action="store_true", help="keep the server (gRPC, HTTP API, web console) up after the rows, until Ctrl-C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", action="append", help="model to demo (repeat; default: the flagship models)")
    p.add_argument("--bundles", help="bundle directory (default: $FEWSHOT_BUNDLES, else bundles/ in the working directory)")


def _run_demo(args: argparse.Namespace) -> None:
    from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
    from fewshot.tools.demo import run_demo

    run_demo(Path(args.bundles) if args.bundles else DEFAULT_BUNDLE_DIR, args.tasks, args.seed, args.model, keep=args.keep)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="in-process adaptation latency (--model), or a running server's latency and throughput (--target)")
    p.add_argument("--model", action="append", help="model (in-process: exactly one; with --target: repeat, default all)")
    p.add_argument("--target", help="HOST:PORT of a running `fewshot serve`: benchmark it through the client SDK")
    p.add_argument(
        "--compare",
        action="store_true",
        help="the served path against its own engine in one run: "
        "Classify through a `fewshot serve` child (SDK, PNG bytes) vs the ONNX Runtime session on tensors, "
        "at 1/8/64 queries and concurrency 1/8; Adapt of the engine vs a plain torch reference loop",
    )
    p.add_argument(
        "--options",
        action="store_true",
        help="with --target: Adapt without and with the support-set report, Classify without and with explain=3, side by side",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="with --target: the latency-throughput curve of Adapt and Classify per model: closed loop at --concurrency "
        "(default 1 2 4 ... 64), then open loop (Poisson arrivals) at --rates; writes --out/sweep.{md,jsonl,png}",
    )
    p.add_argument("--rpc", nargs="+", choices=["adapt", "classify"], default=["adapt", "classify"], help="with --sweep: which RPCs")
    p.add_argument("--rates", type=float, nargs="+", help="with --sweep: open-loop calls/s (default: 0.25x-1.5x the closed-loop peak)")
    p.add_argument("--seconds", type=float, default=10.0, help="with --sweep: seconds per load level")
    p.add_argument("--metrics-url", help="with --sweep: the server's Prometheus endpoint, for its queue wait per level")
    p.add_argument("--out", default="runs/sweep", help="with --sweep: folder of the table, JSON lines and plot")
    p.add_argument("--bundles", help="with --compare: bundle directory (default: $FEWSHOT_BUNDLES, else bundles/)")
    p.add_argument("--calls", type=int, default=32, help="with --compare: Classify calls per round")
    p.add_argument(
        "--rounds", type=int, default=3, help="with --compare: rounds of raw and served calls, alternating (the median is reported)"
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="with --compare: the server and the raw engine on the last core (one thread), the client on the others",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=["classify", "adapt", "cold", "many"],
        default=["classify", "adapt", "cold", "many"],
        help="with --compare: which comparisons (many: inner-loop tasks merged and batched)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", help="with --target: client threads (default 1 8; with --sweep 1 2 4 ... 64)")
    p.add_argument("--requests", type=int, default=64, help="with --target: Adapt and Classify calls per row")
    p.add_argument("--token", default=os.environ.get("FEWSHOT_TOKEN"), help="with --target: bearer token")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--head", help="metric models: one of the heads its card has (default: its default head)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _run_bench(args: argparse.Namespace) -> None:
    from fewshot.tools.bench import run_bench

    run_bench(args)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export shipped models as bundles (ONNX + meta.safetensors + manifest.json)")
    p.add_argument("--model", action="append", required=True, help="shipped model name (repeat for several)")
    p.add_argument("--out", help="bundle directory (default: $FEWSHOT_BUNDLES, else bundles/ in the working directory)")
    p.add_argument("--fp16", action="store_true", help="float16 ONNX graphs (checked: >= 99.5%% top-1 agreement)")
    p.add_argument("--version", help="write DIR/NAME/VERSION/ (a positive integer): versions served side by side (docs/upgrading.md)")
    p.add_argument("--as", dest="served_as", help="the model name the bundle serves under (a retrained model replacing another)")
    p.add_argument("--triton-repo", help="also write a Triton model repository here (backbones; networks of inner-loop models)")
    p.add_argument(
        "--triton-backend",
        default="onnxruntime_onnx",
        choices=["onnxruntime_onnx", "python"],
        help="how the repository runs the ONNX models: Triton's ONNX Runtime backend (default, production), or "
        "python-backend wrappers around ONNX Runtime for Triton builds without it",
    )
    p.add_argument(
        "--triton-state-dir",
        help="also write the python-backend models fewshot_adapt/fewshot_classify "
        "(Adapt and Classify inside Triton; they need fewshot and torch in Triton's python environment), "
        "keeping tasks in this directory: give it `fewshot serve --state-dir` to share tasks with the service",
    )


def _run_export(args: argparse.Namespace) -> None:
    from fewshot.export.bundle import DEFAULT_BUNDLE_DIR, export_model

    out = Path(args.out) if args.out else DEFAULT_BUNDLE_DIR
    if args.served_as and len(args.model) > 1:
        raise ConfigError(f"--as names one bundle; {len(args.model)} models were given: export them one at a time")
    for name in args.model:
        export_model(
            name,
            out,
            fp16=args.fp16,
            triton_repo=Path(args.triton_repo) if args.triton_repo else None,
            triton_backend=args.triton_backend,
            triton_state_dir=Path(args.triton_state_dir) if args.triton_state_dir else None,
            version=args.version,
            served_as=args.served_as,
        )


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="turn your own ONNX image embedder into a metric bundle (served like a shipped one)",
        description="Checks that the graph maps a float batch of images (N, C, S, S) to one vector per "
        "image (N, D), renames its input and output to images/features and writes a bundle of the metric "
        "family (centroid, LaplacianShot, logistic regression) into --out.",
    )
    p.add_argument("--onnx", required=True, help="the ONNX file (images -> one feature vector per image)")
    p.add_argument("--name", required=True, help="the bundle's model name")
    p.add_argument("--input-size", type=int, required=True, help="the side S of the square images the model takes")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument(
        "--mean",
        default="0.485,0.456,0.406",
        help="per-channel mean of pixels in [0, 1] the model was trained with (default: ImageNet's, as torchvision and timm models)",
    )
    p.add_argument("--std", default="0.229,0.224,0.225", help="per-channel standard deviation (default: ImageNet's)")
    p.add_argument("--resize", default="bilinear", choices=["bilinear", "bicubic", "box"])
    p.add_argument("--output", help="the graph output holding the features, when it has several")
    p.add_argument("--sample-folder", help="images (any layout) whose mean feature becomes the centering vector")
    p.add_argument("--val-folder", help="one subfolder per class: tune the heads and calibrate open-set rejection on it")
    p.add_argument("--out", help="bundle directory (default: $FEWSHOT_BUNDLES, else bundles/)")
    p.add_argument("--triton-repo", help="also write its Triton model here")
    p.add_argument(
        "--triton-backend", default="onnxruntime_onnx", choices=["onnxruntime_onnx", "python"], help="as `fewshot export --triton-backend`"
    )
    p.add_argument("--tune-tasks", type=int, default=300, help="seeded validation tasks for choosing head settings")
    p.add_argument("--calibration-tasks", type=int, default=300, help="open-set validation tasks per method and shot count")


def _run_import(args: argparse.Namespace) -> None:
    from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
    from fewshot.export.importer import import_onnx, parse_floats
    from fewshot.models.preprocess import InputSpec

    if not 16 <= args.input_size <= 1024:
        raise ConfigError(f"--input-size must be within 16..1024, got {args.input_size}")
    spec = InputSpec(
        args.channels,
        args.input_size,
        parse_floats(args.mean, args.channels, "mean"),
        parse_floats(args.std, args.channels, "std"),
        args.resize,
    )
    import_onnx(
        Path(args.onnx),
        args.name,
        spec,
        Path(args.out) if args.out else DEFAULT_BUNDLE_DIR,
        Path(args.sample_folder) if args.sample_folder else None,
        Path(args.val_folder) if args.val_folder else None,
        args.output,
        Path(args.triton_repo) if args.triton_repo else None,
        args.tune_tasks,
        args.calibration_tasks,
        triton_backend=args.triton_backend,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from fewshot.server.config import add_arguments

    p = sub.add_parser("serve", help="serve the bundles of a model directory over gRPC (fewshot.v1.FewShot)")
    add_arguments(p)  # every ServeConfig field (server/config.py), declared once there
    p.add_argument("--token-file", help="read the single token from this file (the default tenant)")
    p.add_argument("--admin-token-file", help="read the admin token from this file (admin calls: load, unload, default version)")


def _run_serve(args: argparse.Namespace) -> None:
    from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
    from fewshot.server.app import run
    from fewshot.server.config import from_arguments

    token = _read_token(args.token_file, "--token-file") if args.token_file else args.token
    admin = _read_token(args.admin_token_file, "--admin-token-file") if args.admin_token_file else args.admin_token
    run(from_arguments(args, models=args.models or DEFAULT_BUNDLE_DIR, token=token, admin_token=admin, store=args.store or None))


def _read_token(path: str, flag: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if not token:
        raise ConfigError(f"{flag} {path} is empty")
    return token


def _add_migrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="re-adapt the stored tasks of a model onto another of its versions (resumable; --dry-run: what it would change)",
    )
    p.add_argument("--model", required=True, help="the model whose tasks move")
    p.add_argument(
        "--to", required=True, metavar="VERSION", help="the version they move to (in the model directory; load it on the servers first)"
    )
    p.add_argument("--models", help="model directory (default: $FEWSHOT_BUNDLES, else bundles/)")
    p.add_argument("--state-dir", default=".fewshot-state", help="the servers' task store (SQLite; default .fewshot-state)")
    p.add_argument("--store", default=os.environ.get("FEWSHOT_STORE"), help="the servers' task database instead ($FEWSHOT_STORE)")
    p.add_argument("--concurrency", type=int, default=2, help="tasks re-adapted at once (default 2: serving goes on beside it)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per task (default 1)")
    p.add_argument("--dry-run", action="store_true", help="change nothing: per task, how many support images would change their label")
    p.add_argument("--limit", type=int, help="with --dry-run: look at this many tasks (default: all)")


def _run_migrate(args: argparse.Namespace) -> None:
    import json

    import torch

    from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Registry
    from fewshot.server.migrate import dry_run_task, migrate
    from fewshot.server.store import TaskStore

    if args.concurrency < 1 or args.threads < 1:
        raise ConfigError("--concurrency and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    registry = Registry.load(Path(args.models) if args.models else DEFAULT_BUNDLE_DIR)
    target = open_bundle(registry.version(args.model, args.to), "auto", args.threads)
    store = TaskStore(args.store or Path(args.state_dir))
    try:
        if args.dry_run:
            versions = {b.digest: b for b in registry.versions.get(args.model, {}).values()}
            opened = {d: open_bundle(b, "auto", args.threads) for d, b in versions.items() if d != target.digest}
            opened[target.digest] = target
            pending = store.not_on(args.model, target.digest)[: args.limit]
            changed = images = 0
            for task_id, tenant in pending:
                row = dry_run_task(store, opened, target, task_id, tenant)
                changed, images = changed + row.get("changed", 0), images + row.get("images", 0)
                print(json.dumps(row), flush=True)
            print(f"dry run: {len(pending)} tasks, {changed} of {images} support images would change their label", file=sys.stderr)
            return
        progress = migrate(store, target, args.concurrency, lambda p: print(f"fewshot migrate: {p.line()}", file=sys.stderr, flush=True))
        for task_id, reason in progress.failed.items():
            print(f"fewshot migrate: task {task_id} not migrated: {reason}", file=sys.stderr)
        print(
            json.dumps(
                {"model": args.model, "to": args.to, "migrated": progress.done, "failed": len(progress.failed), "left": progress.left}
            )
        )
        if progress.failed:
            raise ConfigError(f"{len(progress.failed)} tasks could not be migrated (listed above); the others were")
    finally:
        store.close()


def _add_token_hash(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("token-hash", help="read a token on stdin, print the sha256 hash a --tokens file line holds")


def _run_token_hash(args: argparse.Namespace) -> None:
    from fewshot.server.auth import token_hash

    token = sys.stdin.readline().strip()
    if not token:
        raise ConfigError("no token on stdin: `printf %s TOKEN | fewshot token-hash`")
    print(token_hash(token))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewshot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_average(sub)
    _add_eval(sub)
    _add_package(sub)
    _add_tune(sub)
    _add_calibrate(sub)
    _add_report(sub)
    _add_demo(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_import(sub)
    _add_serve(sub)
    _add_token_hash(sub)
    _add_migrate(sub)
    args = parser.parse_args(argv)
    try:
        {
            "train": _run_train,
            "average": _run_average,
            "eval": _run_eval,
            "package": _run_package,
            "tune": _run_tune,
            "calibrate": _run_calibrate,
            "report": _run_report,
            "demo": _run_demo,
            "bench": _run_bench,
            "export": _run_export,
            "import": _run_import,
            "serve": _run_serve,
            "token-hash": _run_token_hash,
            "migrate": _run_migrate,
        }[args.command](args)
    except (FewShotError, OSError) as exc:  # anything else is a bug: its traceback is shown
        print(f"fewshot {args.command}: error: {one_line(str(exc), 2000)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
