#!/usr/bin/env bash
# Packages the training runs of scripts/train-shipped.sh into models/zoo/<name>/ (weights + card).
# Metric models: centering vector from the training classes, head settings tuned on 500 validation
# tasks. Inner-loop models: initial weights and the learned update rule.
# Usage: scripts/package-shipped.sh [name ...]   (default: every run folder with a best.pt)
set -euo pipefail
FEWSHOT=${FEWSHOT:-.venv/bin/fewshot}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for d in runs/*/best.pt; do names+=("$(basename "$(dirname "$d")")"); done
fi
for name in "${names[@]}"; do
  cmd=$(cat "runs/$name/command.txt")
  echo "== packaging $name ($cmd)"
  run="runs/$name"
  for head in prototypes shared ways; do  # the fine-tunes for any number of classes (the last that ran)
    [ ! -f "runs/$name/$head/best.pt" ] || run="runs/$name/$head"
  done
  $FEWSHOT package --run "$run" --name "$name" --train-command "$cmd"
done
