"""The docs as a newcomer reads them (issue 35): README.md is the front door (under 200 lines, a map of every
``docs/`` page), every relative link resolves (to a file, and to a heading for ``#anchor`` links into markdown),
every command block is either run by a test or marked as shown, not run, and every measured figure in the docs'
prose is quoted from RESULTS.md or BENCHMARKS.md. The README's Python SDK example runs here, against a real
server."""

from __future__ import annotations

import ast
import builtins
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: Every markdown file whose relative links are checked.
LINKED = [README, *DOCS, ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md", ROOT / "clients/python/README.md", ROOT / "deploy/k8s/README.md"]
#: Where the measured figures live: the docs quote them from here.
SOURCES = [ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md"]

unit = pytest.mark.unit

#: Every runnable block of README.md and docs/*.md (a ```bash block, and the README's Python example), by its file
#: and its first line (a comment naming it), with the test file and the function (test or fixture) that greps it
#: from that file and runs it. Commands the tests cannot run as written (they need Docker, Triton with its ONNX
#: Runtime backend, a PostgreSQL server of your own, or hours of training) are ```console blocks, each after a
#: sentence saying why it is shown, not run.
RUN_BY = {
    ("README.md", "# Python SDK"): ("tests/test_docs.py", "test_the_readme_python_example_runs_as_written"),
    ("README.md", "# HTTP/JSON API"): ("tests/test_http.py", "test_the_readme_curl_examples_run_as_written"),
    ("docs/training.md", "# Use your own images"): ("tests/test_folders.py", "readme_run"),
    ("docs/bundles.md", "# Use your own backbone"): (
        "tests/test_import.py",
        "test_readme_block_imports_with_sample_and_validation_folders",
    ),
    ("docs/upgrading.md", "# Upgrade a model"): ("tests/test_versions.py", "test_the_upgrading_walkthrough_runs_as_written"),
}
#: Fences of command blocks: ``bash`` is run by a test (RUN_BY), ``console`` is shown, not run.
SHELL_FENCES = {"bash", "sh", "shell", "zsh", "console", "shell-session"}
#: What the sentence before a ```console block says.
NOT_RUN = re.compile(r"not run|no test runs|shown, not run|is shown|a synopsis", re.I)

#: Figures in the docs' prose that are not measurements quoted from RESULTS.md or BENCHMARKS.md, by file and the
#: phrase that holds them, each with the reason. A phrase no longer in its file fails the test (no stale entries).
NOT_QUOTED = {
    ("serving.md", "plus 4 KB per entry"): "a constant of the cache's charge (server/store.py), not a measurement",
    ("serving.md", "at most 64 MB\n  each"): "the message size limit, a flag's default",
    ("serving.md", "2 x R + 160 MB at every moment"): "the bound's formula (server/memory.py peak_bound_mb), not a measurement",
    ("serving.md", "that is 1.18 GB"): "computed from the bound's formula with the defaults: 256 + 1.5 x 512 + 160 MB",
    (
        "serving.md",
        "(128 MB of headroom and 32 MB of support",
    ): "constants of the bound (server/memory.py OVERHEAD_MB, server/explain.py CACHE_BYTES)",
    ("serving.md", "fixed at 1 MB (by default it rises to\n  32 MB"): "glibc's settings (server/memory.py), not measured",
    ("serving.md", "held 16 MB or more"): "the malloc_trim threshold (server/memory.py), a constant",
    ("README.md", "within 5 s)"): "the bound tests/test_versions.py holds replicas to (CONVERGENCE_S), not a measurement",
    ("upgrading.md", "**within 5 s**"): "the bound tests/test_versions.py holds replicas to (CONVERGENCE_S), not a measurement",
    ("serving.md", "at most 1,000 a page"): "ListTasks' page size limit, a constant (server/requests.py MAX_PAGE)",
    ("serving.md", "to flag 2% of clean images"): "the share the mislabel threshold is fitted to flag (report_check.CLEAN_FLAGGED)",
    ("serving.md", "of at least 0.98 on images"): "the near-duplicate threshold, a constant (models/report.py NEAR_DUPLICATE_COSINE)",
    ("serving.md", "within 100 MB of its start-up size"): "the limit tests/test_bounds.py holds the idle process to (issue 34)",
    ("serving.md", "8 MB per encoded image and 16.8 M pixels"): "limits of fewshot serve: flags and their defaults",
    ("serving.md", "64 MB per message"): "a limit of fewshot serve: a flag's default",
    ("serving.md", "older than 0.5 s"): "the re-read interval of the cache, a design constant (server/store.py)",
    ("serving.md", "within **0.5 s plus one query**"): "the bound that interval gives, tested, not measured",
    ("deploy.md", "more than 0.5 s ago"): "the same re-read interval, a design constant",
    ("methods.md", "epsilon 1e-8"): "a constant of the inner-loop network",
    ("methods.md", "moved logits by 6e-3"): "measured once when the epsilon was chosen (commit 1ae764b); no command kept",
    ("methods.md", "the 1e-6 relative"): "LaplacianShot's stopping tolerance, a constant",
    ("methods.md", "+-1.37"): "the 95% interval of the 200 validation tasks whose two means RESULTS.md quotes",
    ("triton.md", "(2.51, python backend only)"): "a version of tritonserver",
    ("training.md", "2.5x faster than float32"): "measured once when bf16 autocast was added (commit 0f72f43); no command kept",
    ("dependencies.md", "about 8x faster than torch eager"): "measured once when ONNX Runtime was chosen (commit 1e2f5bc); no command kept",
    ("dependencies.md", "2-15x faster per image"): "measured when pyspng was added (commit de030ea); "
    "BENCHMARKS.md's decode rows are the kept measurement",
    ("dependencies.md", "made it 20-50x slower"): "measured once when threadpoolctl was added (commit 70a4238); no command kept",
}

FENCE = re.compile(r"^(?P<fence>`{3,})(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
#: A figure: a number, then maybe a unit. Version numbers (x.y.z) are not figures.
FIGURE = re.compile(
    r"(?<![\w.])(?P<sign>\+-|[+-])?(?P<n>\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)(?![\d.]*\.\d)"
    r"(?P<unit>x\b|%|\s?(?:MB|GB|KB)\b)?"
)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code blanked (offsets kept)."""
    text = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), text)


def _blocks(path: Path) -> list[tuple[str, str, str]]:
    """``(language, body, the text before the block)`` of every fenced block."""
    text = path.read_text()
    return [(m.group("lang").strip(), m.group("body"), text[: m.start()]) for m in FENCE.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text())):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [
        m.group("target") for m in LINK.finditer(_without_code(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", m.group("target"))
    ]  # http:, https:, mailto: ...


@unit
def test_slugs_follow_githubs_rules():
    assert slug("Replicas on several hosts: `--store postgresql://...`") == "replicas-on-several-hosts---store-postgresql"
    assert slug("Resident memory per cached task (`scripts/task_memory.py`)") == "resident-memory-per-cached-task-scriptstask_memorypy"
    assert (
        slug("Pre-train, then meta-train: the shipped inner-loop models (issue 33)")
        == "pre-train-then-meta-train-the-shipped-inner-loop-models-issue-33"
    )


@unit
@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_every_relative_link_resolves(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {_rel(dest)}")
    assert not broken, f"{_rel(path)}: " + "; ".join(broken)


@unit
def test_the_readme_is_a_front_door_to_every_docs_page():
    lines = README.read_text().count("\n")
    assert lines < 200, f"README.md has {lines} lines: move the detail into docs/"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [_rel(p) for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"README.md does not link {missing}"


def _function_source(test_file: Path, name: str) -> str:
    source = test_file.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.get_source_segment(source, node) or ""
    raise AssertionError(f"{_rel(test_file)} has no function {name}")


@unit
def test_every_command_block_is_run_by_a_test_or_marked_as_not_run():
    found, problems = set(), []
    for path in [README, *DOCS]:
        for lang, body, before in _blocks(path):
            first = body.split("\n", 1)[0]
            key = next((k for k in RUN_BY if k[0] == _rel(path) and first.startswith(k[1])), None)
            if key:
                found.add(key)
            elif lang == "console":
                lead = " ".join(before.rstrip().rsplit("\n\n", 1)[-1].split())
                if not NOT_RUN.search(lead):
                    problems.append(
                        f"{_rel(path)}: the ```console block {first!r} needs a sentence before it saying why it is shown, not run"
                    )
            elif lang in SHELL_FENCES:
                problems.append(
                    f"{_rel(path)}: ```{lang} block {first!r} is run by no test: add it to RUN_BY (a "
                    "comment as its first line, and a test that runs it) or make it ```console with a "
                    "sentence saying why it is not run"
                )
    problems += [f"{file}: no block starts with {first!r} (RUN_BY)" for file, first in set(RUN_BY) - found]
    assert not problems, "\n".join(problems)


@unit
@pytest.mark.parametrize("key", sorted(RUN_BY), ids=lambda k: f"{k[0]}:{k[1]}")
def test_the_test_of_each_runnable_block_greps_it_from_its_file(key):
    """The function named in RUN_BY reads the block's file and holds a pattern that finds that very block."""
    file, first = key
    test_file, name = RUN_BY[key]
    source = _function_source(ROOT / test_file, name)
    assert f'"{file}"' in source, f"{test_file}::{name} does not read {file}"
    text = (ROOT / file).read_text()
    patterns = [
        c.value
        for c in ast.walk(ast.parse(source))
        if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("```")
    ]
    hits = [m for p in patterns if (m := re.search(p, text, re.S))]
    assert hits and hits[0].group(1).startswith(first), f"{test_file}::{name} has no pattern that finds {first!r}"


def _figures(path: Path) -> list[tuple[str, int]]:
    """The figures of a file's prose: numbers with a decimal point or an exponent, percentages, ratios (``2.5x``),
    signed figures and MB/GB/KB sizes, as ``(figure, offset)``. Code blocks and inline code (commands, flags and
    their defaults), link targets, version numbers and section or equation numbers are not prose figures."""
    text = _without_code(path.read_text())
    text = LINK.sub(lambda m: m.group("text") + " " * (len(m.group(0)) - len(m.group("text"))), text)
    text = re.sub(r"\b(?:Sec|eqs?|Table|Algorithms?)\.? \(?\d[\d.\-, ]*\)?", lambda m: " " * len(m.group(0)), text)
    out = []
    for m in FIGURE.finditer(text):
        n, unit, sign = m.group("n"), m.group("unit"), m.group("sign")
        if not (unit or sign or "." in n or "e" in n):
            continue  # a plain count (600 tasks, 5-way, 2 cores) is a setting, not a measured figure
        out.append((n + (unit or ""), m.start()))
    return out


def _quoted(figure: str, sources: str) -> bool:
    n = re.match(r"[\d,.e-]+", figure).group(0).replace(",", "")
    unit = figure[len(re.match(r"[\d,.e-]+", figure).group(0)) :].strip()
    number = re.escape(n) + r"(?![\d]|\.\d)"
    if unit:
        number += r"\s?" + re.escape(unit) + (r"(?!\w)" if unit[-1].isalnum() else "")
    return re.search(r"(?<![\w.])" + number, sources) is not None


@unit
def test_every_figure_in_the_docs_is_quoted_from_results_or_benchmarks():
    sources = re.sub(r"\s+", " ", " ".join(p.read_text() for p in SOURCES)).replace(",", "")
    unquoted, used = [], set()
    for path in [README, *DOCS]:
        text = path.read_text()
        allowed = []
        for (name, phrase), _reason in NOT_QUOTED.items():
            if name == path.name:
                start = text.find(phrase)
                assert start >= 0, f"NOT_QUOTED: {phrase!r} is no longer in {_rel(path)}: drop the entry"
                allowed.append((start, start + len(phrase)))
                used.add((name, phrase))
        for figure, at in _figures(path):
            if any(a <= at < b for a, b in allowed) or _quoted(figure, sources):
                continue
            line = text.count("\n", 0, at) + 1
            unquoted.append(f"{_rel(path)}:{line}: {figure}")
    assert not unquoted, (
        "figures in the docs that neither RESULTS.md nor BENCHMARKS.md holds (quote them from "
        "there, or move the measurement there with its command, machine and date):\n" + "\n".join(unquoted)
    )
    assert used == set(NOT_QUOTED), f"NOT_QUOTED entries for files that are gone: {set(NOT_QUOTED) - used}"


def test_the_readme_python_example_runs_as_written(server, omniglot_test, tmp_path):
    """The README's Python SDK block, run by python against the test server (its address for the default port), on
    real Omniglot test images written as PNG files."""
    from fewshot.models.episodes import EpisodeSampler
    from fewshot.models.preprocess import encode_png

    block = re.search(r"```python\n(# Python SDK.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    ep = EpisodeSampler(omniglot_test, 2, 2, 1, seed=4).episode(0)
    names = {0: ["a1.png", "a2.png"], 1: ["b1.png"]}
    for label in (0, 1):
        for name, index in zip(names[label], [i for i, y in zip(ep.support, ep.support_labels) if y == label]):
            (tmp_path / name).write_bytes(encode_png(omniglot_test.images[index]))
    (tmp_path / "q.png").write_bytes(encode_png(omniglot_test.images[ep.query[0]]))
    assert '"127.0.0.1:50051"' in block
    run = subprocess.run(
        [sys.executable, "-c", block.replace("127.0.0.1:50051", server.target)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    label, score, scores = run.stdout.strip().split(" ", 2)
    assert label in ("cat", "dog") and 0 < float(score) <= 1
    assert set(ast.literal_eval(scores)) == {"cat", "dog"}


def _defined_names() -> set[str]:
    """Every class, function and module-level name defined in the package's and the SDK's Python files."""
    names: set[str] = set()
    for folder in ("fewshot", "models", "server", "export", "clients/python/fewshot_client", "protos/python/fewshot_proto"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
    return names


@unit
def test_the_architecture_page_names_only_what_exists():
    """Each file, folder, class and function docs/architecture.md names exists, and the three transports import
    the one request core it says they share."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
    named = set(re.findall(r"`([\w./-]+\.(?:py|proto|toml|sh|html))`", text))
    missing = [n for n in named if not any(f == n or f.endswith("/" + n) for f in files)]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    folders = set(re.findall(r"`([\w.-]+(?:/[\w.-]+)*)/`", text))
    assert not [f for f in folders if not any((ROOT / g / f).is_dir() for g in ("", "models", "server", "fewshot", "deploy"))], folders
    identifiers = {m.split("(")[0].split(".")[-1] for m in re.findall(r"`([A-Za-z_][\w.]*)(?:\(|`)", text)}
    code_like = {i for i in identifiers if re.fullmatch(r"[A-Z][a-z]+[A-Z]\w*|[a-z]+_[a-z_]+|[A-Z][A-Z_]{3,}", i)}
    packages = {p.name for p in (ROOT / "clients" / "python").iterdir()} | {p.name for p in (ROOT / "protos" / "python").iterdir()}
    triton_models = set(re.findall(r'"(fewshot_\w+)"', (ROOT / "export" / "triton.py").read_text()))
    defined = _defined_names() | set(dir(builtins)) | packages | triton_models
    assert not sorted(code_like - defined), f"docs/architecture.md names code that does not exist: {sorted(code_like - defined)}"
    for transport in ("service.py", "http_api.py", "triton_models.py"):
        source = (ROOT / "server" / transport).read_text()
        assert "from fewshot.server.requests import" in source, transport
