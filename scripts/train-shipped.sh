#!/usr/bin/env bash
# Trains the shipped metric-path backbones (issue: foundation). Same budget and seed within the
# Tiny ImageNet ablation (SCE, SCE+NCA, SCE(+)NCA). About 25 minutes each on 2 CPU cores (bf16).
# Usage: scripts/train-shipped.sh [name ...]   (default: all)
set -euo pipefail
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864 MALLOC_TOP_PAD_=67108864
FEWSHOT=${FEWSHOT:-.venv/bin/fewshot}
THREADS="--threads ${FEWSHOT_THREADS:-0}"  # 0: all cores; the budget is counted in epochs, not time
TI="--dataset tinyimagenet --arch conv4 --width 64 --epochs 10 --batch-classes 32 --batch-shots 4 --lr 0.05 --temperature 64 --seed 0"
OMNI="--dataset omniglot --arch conv4 --width 64 --pools 2 --epochs 20 --batch-classes 32 --batch-shots 4 --lr 0.05 --temperature 64 --seed 0"
declare -A RUNS=(
  [tinyimagenet-conv4-sce-nca-directsum]="$TI --loss sce --metric nca --combine directsum"
  [omniglot-conv4-directsum]="$OMNI --loss sce --metric nca --combine directsum"
  [tinyimagenet-conv4-sce]="$TI --loss sce --metric none"
  [tinyimagenet-conv4-sce-nca-sum]="$TI --loss sce --metric nca --combine sum"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(tinyimagenet-conv4-sce-nca-directsum omniglot-conv4-directsum tinyimagenet-conv4-sce tinyimagenet-conv4-sce-nca-sum)
for name in "${names[@]}"; do
  echo "== $name: fewshot train ${RUNS[$name]} --out runs/$name"
  $FEWSHOT train ${RUNS[$name]} $THREADS --out "runs/$name" --resume
done
