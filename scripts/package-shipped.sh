#!/usr/bin/env bash
# Packages the training runs of scripts/train-shipped.sh into models/zoo/<name>/ (weights + card:
# centering vector from the training classes, head settings tuned on 500 validation tasks).
# Usage: scripts/package-shipped.sh [name ...]   (default: every run folder present)
set -euo pipefail
FEWSHOT=${FEWSHOT:-.venv/bin/fewshot}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for d in runs/*/best.pt; do names+=("$(basename "$(dirname "$d")")"); done
fi
for name in "${names[@]}"; do
  cmd=$(grep -F "[$name]=" scripts/train-shipped.sh | sed -E 's/.*="(.*)"/\1/')
  base=$(grep -E "^(TI|OMNI)=" scripts/train-shipped.sh | sed -E 's/^(TI|OMNI)="(.*)"/\1=\2/')
  case "$name" in omniglot*) prefix=$(echo "$base" | sed -n 's/^OMNI=//p');; *) prefix=$(echo "$base" | sed -n 's/^TI=//p');; esac
  train_cmd="fewshot train ${cmd/\$TI/$prefix}"
  train_cmd="${train_cmd/\$OMNI/$prefix} --out runs/$name"
  echo "== packaging $name ($train_cmd)"
  $FEWSHOT package --run "runs/$name" --name "$name" --train-command "$train_cmd"
done
