"""The ``fewshot-client`` command: adapt, update, classify, models, delete."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fewshot_client.client import FewShotClient
from fewshot_client.errors import FewShotError
from fewshot_client.messages import ModelInfo, ModelVersionInfo, SettingInfo, SupportReport

PROG = "fewshot-client"


class CommandError(Exception):
    """A failure to report as one error line (exit code 1)."""


def support_set(directory: Path) -> tuple[list[Path], list[str]]:
    """The images and labels of a support directory: one subfolder per class, named by its label,
    every regular file inside it an image."""
    if not directory.is_dir():
        raise CommandError(f"support directory {directory} does not exist")
    images, labels = [], []
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        images += files
        labels += [folder.name] * len(files)
    if not images:
        raise CommandError(f"support directory {directory} has no class subfolder with images")
    return images, labels


def image_folder(directory: Path) -> list[Path]:
    """Every regular file directly in ``directory`` (sorted): images without labels (``adapt --unlabeled``)."""
    if not directory.is_dir():
        raise CommandError(f"unlabeled directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if not files:
        raise CommandError(f"unlabeled directory {directory} has no image file")
    return files


def setting(text: str) -> tuple[str, float | str]:
    """``NAME=VALUE`` -> ``(name, value)``: a number when VALUE reads as one, else the text (a choice)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        return name, value


def cmd_adapt(client: FewShotClient, args: argparse.Namespace) -> None:
    images, labels = support_set(args.support)
    if args.unlabeled is not None and not args.report:
        raise CommandError("--unlabeled images only feed the support-set report: add --report")
    unlabeled = image_folder(args.unlabeled) if args.unlabeled is not None else []
    task = client.adapt(
        images,
        labels,
        args.model,
        method=args.method,
        inner_steps=args.inner_steps,
        lam=args.lam,
        ttl_seconds=args.ttl,
        settings=dict(args.set or []),
        model_version=args.model_version,
        report=args.report,
        unlabeled=unlabeled,
    )
    print(task.id)
    print(
        f"adapted {task.model} ({task.method}) to {len(task.labels)} labels, {len(images)} images: "
        f"support accuracy {task.support_accuracy:.3f}, {task.adapt_seconds:.3f} s",
        file=sys.stderr,
    )
    if task.report is not None:
        print(report_text(task.report, [str(p) for p in images]), file=sys.stderr)


def report_text(report: SupportReport, names: Sequence[str]) -> str:
    """The support-set report as lines for a person (``names``: what to call each support image)."""
    if report.estimate is None:
        lines = [f"expected accuracy: not available ({report.note})"]
    else:
        lines = [
            f"expected accuracy on new images: {report.estimate:.1f}% (95% interval {report.low:.1f}-{report.high:.1f}%; "
            f"{report.scheme}, {report.held_out} images held out, {report.extra_adaptations} extra adaptations)"
        ]
        if report.note:
            lines.append(f"  note: {report.note}")
    if report.unlabeled_confidence is not None:
        lines.append(f"  read {report.unlabeled} unlabeled images: mean confidence {report.unlabeled_confidence:.1f}%")
    for a, b, percent in report.confusions:
        lines.append(f"  may confuse {a!r} and {b!r} ({percent:.1f}%)")
    for f in report.flags:
        name = names[f.index] if f.index < len(names) else f"image {f.index}"
        what = {
            "mislabel": f"labelled {f.label!r} but looks like {f.looks_like!r} (score {f.score:.2f})",
            "duplicate": f"the same image as {names[f.other] if f.other is not None and f.other < len(names) else f.other}",
            "near_duplicate": f"nearly the same image as {names[f.other] if f.other is not None and f.other < len(names) else f.other} (cosine {f.score:.3f})",
            "outlier": f"far from the other {f.label!r} images ({f.score:.2f}x the usual distance)",
        }.get(f.kind, f"{f.kind} ({f.score:.3f})")
        lines.append(f"  {f.kind}: {name}: {what}")
    if not report.flags:
        lines.append("  no support image flagged")
    return "\n".join(lines)


def cmd_update(client: FewShotClient, args: argparse.Namespace) -> None:
    images, labels = support_set(args.support) if args.support else ([], [])
    if not images and not args.remove:
        raise CommandError("nothing to update: give --support DIR (images to add) and/or --remove LABEL")
    response = client.update(args.task, images, labels, args.remove or [])
    print(response.version)
    shots = ", ".join(f"{label} {n}" for label, n in zip(response.labels, response.shots))
    print(
        f"updated {args.task} to version {response.version}: {len(response.labels)} labels ({shots}), support "
        f"accuracy {response.support_accuracy:.3f}, {response.adapt_seconds:.3f} s",
        file=sys.stderr,
    )


def cmd_classify(client: FewShotClient, args: argparse.Namespace) -> None:
    reject = args.reject_unknown or args.threshold is not None or args.target_recall is not None
    predictions = client.classify(
        args.task,
        args.images,
        top_k=args.top_k,
        reject_unknown=reject,
        threshold=args.threshold,
        target_recall=args.target_recall,
        explain=args.explain,
    )
    for path, p in zip(args.images, predictions):
        if args.json:
            open_set = (
                {"unknown": p.unknown, "open_set_score": p.open_set_score, "threshold": p.threshold, "score_name": p.score_name}
                if reject
                else {}
            )
            nearest = {"nearest": [{"index": i, "label": label, "similarity": sim} for i, label, sim in p.nearest]} if args.explain else {}
            print(
                json.dumps(
                    {"path": path, "label": p.label, "score": p.score, "ranked": p.ranked, "scores": p.scores, **open_set, **nearest}
                )
            )
        else:
            verdict = ("\tunknown" if p.unknown else "\tknown") if reject else ""
            near = "".join(f"\tnear support {i} ({label}, {sim:.3f})" for i, label, sim in p.nearest)
            print(f"{path}\t{p.label}\t{p.score:.6f}{verdict}{near}")


def cmd_models(client: FewShotClient, args: argparse.Namespace) -> None:
    action = getattr(args, "action", None)
    if action is not None:  # load | unload | default: admin calls
        token = read_token(args.admin_token_file) if args.admin_token_file else os.environ.get("FEWSHOT_ADMIN_TOKEN", "")
        if not token:
            raise CommandError(f"`models {action}` needs the admin token: --admin-token-file FILE or $FEWSHOT_ADMIN_TOKEN")
        if action == "canary":
            info = client.set_canary(args.model, args.version, token, args.percent, args.tenant or [])
            done = f"{args.percent:g}% and tenants {', '.join(args.tenant or []) or 'none'} to" if args.version else "ended the canary of"
            print(f"{done} {args.model}{' version ' + args.version if args.version else ''}", file=sys.stderr)
        else:
            if action == "migrate":
                status = client.migrate_tasks(args.model, args.version, token)
                print(f"migrating {args.model} to version {args.version}: {status.done} done, {status.left} left, {status.failed} failed")
                return
            call = {"load": client.load_model, "unload": client.unload_model, "default": client.set_default_version}[action]
            info = call(args.model, args.version, token)
            done = {"load": "loaded", "unload": "unloaded", "default": "made the default version of"}[action]
            print(f"{done} {args.model} version {args.version}", file=sys.stderr)
        print(_describe_versions(info) if info is not None else f"{args.model}: no version loaded")
        return
    for m in client.models():
        spec = m.input
        print(
            f"{m.name}\t{m.family}\tmethods {','.join(m.methods)} (default {m.default_method})\t"
            f"input {spec.channels}x{spec.size}x{spec.size}\tways {m.min_ways}-{m.max_ways}\t"
            f"shots <= {m.max_shots}\tsettings {', '.join(map(_describe_setting, m.settings)) or 'none'}\t"
            f"{_describe_versions(m)}"
        )


def _describe_versions(m: ModelInfo) -> str:
    """``versions 1 (3f2a9c1b8e7d, 12 tasks), 2* (...)``: the loaded versions, ``*`` marking the default."""
    return "versions " + ", ".join(map(_describe_version, m.versions))


def _describe_version(v: ModelVersionInfo) -> str:
    canary = f", canary {v.canary_percent:g}%" if v.canary_percent else ""
    canary += f", canary tenants {'+'.join(v.canary_tenants)}" if v.canary_tenants else ""
    return f"{v.version}{'*' if v.default else ''} ({v.digest[:12]}, {v.live_tasks} tasks{canary})"


def _describe_setting(s: SettingInfo) -> str:
    """``name in lo..hi`` or ``name one of a|b``, with the methods that take it."""
    what = f"one of {'|'.join(s.choices)}" if s.kind == "choice" else f"in {s.min:g}..{s.max:g}"
    return f"{s.name} {what} ({'/'.join(s.methods)})"


def cmd_tasks(client: FewShotClient, args: argparse.Namespace) -> None:
    token = ""
    while True:
        page = client.list_tasks(args.page_size, token)
        for t in page.tasks:
            print(
                f"{t.task_id}\t{t.model} version {t.model_version}\t{t.method}\t{t.ways} ways, {t.support_size} images\t"
                f"v{t.version}\t{t.size_bytes} bytes\tcreated {t.created_at:.0f} updated {t.updated_at:.0f} expires {t.expires_at:.0f}"
            )
        token = page.next_page_token
        if not token or not args.all:
            break
    if token:
        print(f"more: --page-token {token}", file=sys.stderr)


def cmd_export(client: FewShotClient, args: argparse.Namespace) -> None:
    blob = client.export_task(args.task)
    args.out.write_bytes(blob)
    print(f"exported {args.task} to {args.out} ({len(blob)} bytes)", file=sys.stderr)


def cmd_import(client: FewShotClient, args: argparse.Namespace) -> None:
    task = client.import_task(args.blob.read_bytes(), args.ttl)
    print(task.id)
    print(f"imported {task.model} version {task.model_version} ({task.method}) with {len(task.labels)} labels", file=sys.stderr)


def cmd_delete(client: FewShotClient, args: argparse.Namespace) -> None:
    if not client.delete(args.task):
        raise CommandError(f"task {args.task} does not exist")
    print(f"deleted {args.task}")


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` switches a flag on (1, true, yes or on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_path(name: str) -> Path | None:
    """Environment variable ``name`` as a path; None when unset or empty."""
    value = os.environ.get(name, "")
    return Path(value) if value else None


def read_token(path: Path) -> str:
    """The bearer token in file ``path``, stripped; raises CommandError if it is unreadable or empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise CommandError(f"cannot read the token file {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise CommandError(f"the token file {path} is not UTF-8 text") from err
    if not token:
        raise CommandError(f"the token file {path} is empty")
    return token


def parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets ``run``."""
    p = argparse.ArgumentParser(prog=PROG, description="Client of the fewshot.v1.FewShot service.")
    p.add_argument(
        "--target",
        default=os.environ.get("FEWSHOT_TARGET", "127.0.0.1:50051"),
        help="HOST:PORT of the server, IP:PORT,IP:PORT,... of replicas or dns:///NAME:PORT (calls "
        "balanced over them; default: $FEWSHOT_TARGET or 127.0.0.1:50051)",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", default=os.environ.get("FEWSHOT_TOKEN"), help="bearer token (default: $FEWSHOT_TOKEN)")
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the bearer token from FILE (surrounding whitespace stripped); overrides $FEWSHOT_TOKEN",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    tls = p.add_argument_group("TLS", "any of --ca-cert, --client-cert, --client-key implies --tls")
    tls.add_argument(
        "--tls",
        action="store_true",
        default=env_flag("FEWSHOT_TLS"),
        help="connect over TLS, verifying the server against the system's CAs unless --ca-cert is given (default: on if $FEWSHOT_TLS is 1)",
    )
    tls.add_argument(
        "--ca-cert",
        type=Path,
        metavar="FILE",
        default=env_path("FEWSHOT_CA_CERT"),
        help="PEM file of the CA(s) to verify the server against (default: $FEWSHOT_CA_CERT)",
    )
    tls.add_argument(
        "--client-cert",
        type=Path,
        metavar="FILE",
        default=env_path("FEWSHOT_CLIENT_CERT"),
        help="PEM client certificate (chain) for mutual TLS, with --client-key (default: $FEWSHOT_CLIENT_CERT)",
    )
    tls.add_argument(
        "--client-key",
        type=Path,
        metavar="FILE",
        default=env_path("FEWSHOT_CLIENT_KEY"),
        help="PEM private key of --client-cert (default: $FEWSHOT_CLIENT_KEY)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    adapt = sub.add_parser("adapt", help="adapt a model to a support directory; prints the task id")
    adapt.add_argument("--model", required=True)
    adapt.add_argument(
        "--support", required=True, type=Path, metavar="DIR", help="one subfolder per class (its name is the label) holding the images"
    )
    adapt.add_argument("--method", help="inner_loop, centroid or laplacianshot (default: the model's)")
    adapt.add_argument(
        "--set",
        type=setting,
        action="append",
        metavar="NAME=VALUE",
        help=f"a per-request setting (repeatable); which ones each model takes, with bounds: `{PROG} models`",
    )
    adapt.add_argument("--inner-steps", type=int, help="shortcut for --set inner_steps=N")
    adapt.add_argument("--lam", type=float, help="shortcut for --set lambda=X")
    adapt.add_argument("--ttl", type=int, help="task time-to-live in seconds (default: the server's)")
    adapt.set_defaults(run=cmd_adapt)

    update = sub.add_parser("update", help="add images (new shots or classes) to a task or remove classes; prints the new version")
    update.add_argument("--task", required=True, metavar="ID")
    update.add_argument("--support", type=Path, metavar="DIR", help="images to add: one subfolder per class")
    update.add_argument("--remove", action="append", metavar="LABEL", help="class to remove (repeat)")
    update.set_defaults(run=cmd_update)

    classify = sub.add_parser("classify", help="classify images against a task")
    classify.add_argument("--task", required=True, metavar="ID")
    classify.add_argument("--top-k", type=int, default=1, metavar="K")
    classify.add_argument("--json", action="store_true", help="print JSON lines")
    classify.add_argument(
        "--reject-unknown",
        action="store_true",
        help="say for each image whether it fits none of "
        "the task's labels (at the model's calibrated threshold for 95%% acceptance of known ones)",
    )
    classify.add_argument(
        "--target-recall", type=float, metavar="R", help="with rejection: accept this fraction (0.5..0.99) of known-class images instead"
    )
    classify.add_argument(
        "--explain", type=int, default=0, metavar="K", help="also name the K (at most 10) support images nearest each query (support index)"
    )
    classify.add_argument("--threshold", type=float, metavar="S", help="with rejection: this score threshold instead")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.set_defaults(run=cmd_classify)

    models = sub.add_parser(
        "models", help="list the served models and their versions; load, unload or set the default version (admin token)"
    )
    models.set_defaults(run=cmd_models)
    actions = models.add_subparsers(dest="action", metavar="ACTION")
    for action, text in (
        ("load", "verify and load VERSION of MODEL from the server's model directory"),
        ("unload", "stop serving VERSION of MODEL (its tasks answer FAILED_PRECONDITION until it is loaded again)"),
        ("default", "make the loaded VERSION the one adapts of MODEL use when they name none"),
        ("migrate", "re-adapt MODEL's stored tasks onto its loaded VERSION in the server's background (called again: the progress)"),
    ):
        one = actions.add_parser(action, help=text)
        one.add_argument("model", metavar="MODEL")
        one.add_argument("version", metavar="VERSION")
        one.add_argument(
            "--admin-token-file", type=Path, metavar="FILE", help="read the admin token from FILE (default: $FEWSHOT_ADMIN_TOKEN)"
        )
    canary = actions.add_parser("canary", help="send a share of MODEL's new adapts to a candidate VERSION (no VERSION: end the canary)")
    canary.add_argument("model", metavar="MODEL")
    canary.add_argument("version", metavar="VERSION", nargs="?")
    canary.add_argument("--percent", type=float, default=0.0, help="share of adapts naming no version sent to VERSION, 0..100")
    canary.add_argument("--tenant", action="append", metavar="NAME", help="a tenant whose adapts all go to VERSION (repeat)")
    canary.add_argument(
        "--admin-token-file", type=Path, metavar="FILE", help="read the admin token from FILE (default: $FEWSHOT_ADMIN_TOKEN)"
    )
    adapt.add_argument("--model-version", metavar="VERSION", help="one of the model's loaded versions (default: its default version)")
    adapt.add_argument(
        "--report",
        action="store_true",
        help="also compute the support-set report (expected accuracy, confused labels, flagged images) and print it",
    )
    adapt.add_argument(
        "--unlabeled",
        type=Path,
        metavar="DIR",
        help="with --report: a folder of images of the kinds the task will be asked about, without labels (e.g. a "
        "sample of its traffic); the report reads them for a sharper estimate and mislabel flags",
    )

    tasks = sub.add_parser("tasks", help="list your live tasks, oldest first")
    tasks.add_argument("--page-size", type=int, default=100, metavar="N")
    tasks.add_argument("--all", action="store_true", help="every page, not only the first")
    tasks.set_defaults(run=cmd_tasks)

    export = sub.add_parser("export", help="write a task as one blob (its stored state) that `import` takes on another server")
    export.add_argument("--task", required=True, metavar="ID")
    export.add_argument("--out", required=True, type=Path, metavar="FILE")
    export.set_defaults(run=cmd_export)

    imported = sub.add_parser("import", help="a new task from an exported blob; prints its id")
    imported.add_argument("blob", type=Path, metavar="FILE")
    imported.add_argument("--ttl", type=int, help="time-to-live in seconds (default: the server's)")
    imported.set_defaults(run=cmd_import)

    delete = sub.add_parser("delete", help="delete a task")
    delete.add_argument("--task", required=True, metavar="ID")
    delete.set_defaults(run=cmd_delete)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code (1 on errors, 2 on usage errors)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    run: Callable[[FewShotClient, argparse.Namespace], None] = args.run
    try:
        token = read_token(args.token_file) if args.token_file else args.token
        targets = args.target.split(",") if "," in args.target else args.target
        with FewShotClient(
            targets,
            token=token,
            timeout=args.timeout,
            tls=args.tls,
            root_certificates=args.ca_cert,
            client_certificate=args.client_cert,
            client_key=args.client_key,
        ) as client:
            run(client, args)
    except (FewShotError, CommandError, OSError, ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
