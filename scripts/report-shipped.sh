#!/usr/bin/env bash
# Usage: scripts/report-shipped.sh [TASKS] [FIT_TASKS]. Fits the support-set report's settings (estimate map,
# mislabel threshold) of every flagship model and method on validation tasks, writes them into the model cards, and
# measures the report on TASKS (default 600) seeded 5-way 5-shot test tasks: one JSON line per row in
# runs/report/report.jsonl (RESULTS.md, "Support-set report"), then the Tiny ImageNet rows again with unlabeled
# images (runs/report/unlabeled.jsonl), then the MAML models (runs/report/maml.jsonl). Each row runs on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${1:-600}
FIT=${2:-300}
mkdir -p runs/report
out=runs/report/report.jsonl
rows=(
  "tinyimagenet-conv4-sce-nca-directsum centroid"
  "tinyimagenet-conv4-sce-nca-directsum laplacianshot"
  "tinyimagenet-conv4-sce-nca-directsum logreg"
  "omniglot-conv4-directsum centroid"
  "omniglot-conv4-directsum laplacianshot"
  "omniglot-conv4-directsum logreg"
  "tinyimagenet-conv4-cxgrad inner_loop"
  "omniglot-conv4-cxgrad inner_loop"
)
measure() {  # measure OUT EXTRA_ARGS ROWS...: one `fewshot report` per row not yet in OUT
  local out=$1 extra=$2
  shift 2
  for row in "$@"; do
    read -r model method <<<"$row"
    if [[ -f $out ]] && grep -q "\"model\": \"$model\", \"method\": \"$method\"" "$out"; then
      continue  # measured already: the script resumes where it stopped
    fi
    # shellcheck disable=SC2086  # EXTRA_ARGS are words
    OMP_NUM_THREADS=1 .venv/bin/fewshot report --model "$model" --method "$method" --ways 5 --shots 5 \
      --tasks "$TASKS" --fit-tasks "$FIT" --seed 0 --write-card --json $extra >>"$out"
  done
}
measure "$out" "" "${rows[@]}"
# the same Tiny ImageNet rows with 30 unlabeled images per class beside the 15 scored queries (Omniglot has 20 images
# a class: none left after 5 shots and 15 queries): runs/report/unlabeled.jsonl
measure runs/report/unlabeled.jsonl "--unlabeled 30" "${rows[0]}" "${rows[1]}" "${rows[2]}" "${rows[6]}"
# the shipped MAML models (support set alone: runs/report/maml.jsonl; Tiny ImageNet's with unlabeled images too)
measure runs/report/maml.jsonl "" "tinyimagenet-conv4-maml inner_loop" "omniglot-conv4-maml inner_loop"
measure runs/report/unlabeled.jsonl "--unlabeled 30" "tinyimagenet-conv4-maml inner_loop"
