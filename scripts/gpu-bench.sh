#!/usr/bin/env bash
# Usage: scripts/gpu-bench.sh [--device cuda|cpu] [OUT]. The GPU figures of BENCHMARKS.md ("On a GPU") in
# OUT/gpu-bench.json (default runs/gpu), in at most 8 minutes: exports the shipped models, then
# scripts/gpu_bench.py (ONNX Runtime per execution provider, the inner loop eager / reference / CUDA graph,
# batched Adapt at 1, 8, 32, 128 tasks, merged Classify). `--device cpu` checks the whole script on a CPU machine
# (tests/test_sweep.py runs it so). On a device machine (no network): this tree's package is installed without
# fetching anything; the CUDA wheels (onnxruntime-gpu, whose 256 MB wheel is over what travels with the tree, so
# by default ONNX Runtime's CPU provider is what that machine measures) are installed from .whl/ where carried;
# the data comes from $FEWSHOT_DATA (a carried copy: Omniglot travels, Tiny ImageNet's 145 MB do not, and the
# models of data that is not there are left out, each with the reason, in the JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE=$2; shift 2; fi
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
if ! "$PY" -c "import fewshot" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
if [[ $DEVICE == cuda && -d .whl ]]; then
  "$PY" -m pip install -q --no-index --no-deps --upgrade .whl/*.whl
fi
bundles=${GPU_BENCH_BUNDLES:-}  # bundles exported already (the test's); else every shipped model, exported here
if [[ -z $bundles ]]; then
  bundles=$OUT/bundles
  models=$("$PY" -c "from fewshot.models.zoo import shipped_models; print(' '.join('--model ' + m for m in shipped_models()))")
  # shellcheck disable=SC2086  # one word per option
  timeout 120 "$PY" -m fewshot.cli export $models --out "$bundles" >"$OUT/export.log" 2>&1
fi
quick=()
if [[ $DEVICE == cpu ]]; then quick=(--quick); fi
timeout 330 "$PY" scripts/gpu_bench.py --device "$DEVICE" --bundles "$bundles" --out "$OUT/gpu-bench.json" "${quick[@]}"
