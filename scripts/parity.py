"""Export every shipped model with ``--fp16`` and record the parity figures the export checks in RESULTS.md.

Each row is ``fewshot export --model NAME --fp16 --out DIR``: fp32 ONNX Runtime vs torch on 256 real
images (max abs difference; for inner-loop models also the logits of ``network.onnx`` under
adapted weights of real tasks) and fp16 vs fp32 top-1 agreement on the queries of 600 real tasks.
Usage: ``python scripts/parity.py [--models NAME ...]`` (rewrites the block between the markers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fewshot.export.bundle import export_model
from fewshot.models.zoo import shipped_models

START, END = "<!-- parity.py: start -->", "<!-- parity.py: end -->"


def measure(names: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            export_model(name, Path(out), fp16=True, log=print)
            manifest = json.loads((Path(out) / name / "manifest.json").read_text())
            rows.append({"model": name, "family": manifest["family"], **manifest["parity"]})
    return rows


def _diff(row: dict, file: str) -> str:
    scale = f" (scale {row[file + '_scale']:.3g})" if f"{file}_scale" in row else ""
    return f"{row[file + '_max_abs_diff']:.2e}{scale}"


def markdown(rows: list[dict]) -> str:
    lines = [
        START,
        "## Export parity (`fewshot export --fp16`)",
        "",
        "Checked at export time; the export fails if fp32 differs from torch by more than 1e-4 times the output scale",
        "(the largest absolute torch output, at least 1; shown in brackets where measured) or fp16 agrees",
        "with fp32 on fewer than 99.5% of the queries of 600 real test tasks (seed 0). Reproduce a row with",
        "`fewshot export --model NAME --fp16 --out DIR`; the whole table with `python scripts/parity.py`.",
        "",
        "| model | backbone.onnx fp32 max abs diff (256 images) | network.onnx fp32 max abs diff (adapted weights) | fp16 top-1 agreement (600 tasks) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        network = _diff(r, "network") if "network_max_abs_diff" in r else "n/a (metric model)"
        lines.append(f"| {r['model']} | {_diff(r, 'backbone')} | {network} | {r['fp16_top1_agreement']:.2f}% |")
    return "\n".join(lines + [END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", help="default: every shipped model")
    parser.add_argument("--out", default="RESULTS.md")
    args = parser.parse_args()
    names = args.models or shipped_models()
    path = Path(args.out)
    rows = measure(names)  # minutes; the file is read only afterwards, so edits made meanwhile are kept
    text = path.read_text()
    old = {}
    if START in text:
        block = text[text.index(START) : text.index(END) + len(END)]
        for line in block.splitlines():
            if line.startswith("| ") and not line.startswith("| model"):
                old[line.split(" | ")[0][2:]] = line
        text = text.replace(block, "@@PARITY@@")
    else:
        text = text.rstrip() + "\n\n@@PARITY@@\n"
    table = markdown(rows)
    kept = [line for model, line in old.items() if model not in names]  # rows of models not re-measured
    if kept:
        table = table.replace(END, "\n".join(kept) + "\n" + END)
    path.write_text(text.replace("@@PARITY@@", table))
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
