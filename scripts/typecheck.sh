#!/usr/bin/env bash
# Usage: scripts/typecheck.sh. mypy (configured in pyproject.toml) on models/, server/, export/ and the client SDK.
# The server's folders are installed as fewshot.models, fewshot.server and fewshot.export (pyproject's
# package-dir), a layout mypy cannot follow through an editable install, so it checks a temporary tree of
# symlinks with that layout; the SDK is checked from its own folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MYPY=${MYPY:-$ROOT/.venv/bin/mypy}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/fewshot"
for entry in fewshot/*.py fewshot/tools; do ln -s "$ROOT/$entry" "$tree/fewshot/"; done
for folder in models server export; do ln -s "$ROOT/$folder" "$tree/fewshot/$folder"; done
(cd "$tree" && "$MYPY" --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" \
    -p fewshot.models -p fewshot.server -p fewshot.export)
(cd clients/python && "$MYPY" --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" -p fewshot_client)
