#!/usr/bin/env bash
# Usage: scripts/sweep-bench.sh [SECONDS_PER_LEVEL] [OUT]. The latency-throughput curve (BENCHMARKS.md, "Latency
# under load"): exports the four flagship models, starts `fewshot serve` on them (defaults, metrics on), runs
# `fewshot bench --sweep` against it (closed loop 1..64 clients, then open loop with Poisson arrivals at 0.25x-1.5x
# the closed-loop peak; Adapt and Classify of each model), writes OUT/sweep.{md,jsonl,png} and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_LEVEL=${1:-3}
OUT=${2:-runs/sweep}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
models=(omniglot-conv4-directsum tinyimagenet-conv4-sce-nca-directsum omniglot-conv4-cxgrad tinyimagenet-conv4-cxgrad)
.venv/bin/fewshot export $(printf -- '--model %s ' "${models[@]}") --out "$work/bundles" >/dev/null
port=$(.venv/bin/python -c 'from fewshot.tools.launch import free_port; print(free_port())')
metrics=$(.venv/bin/python -c 'from fewshot.tools.launch import free_port; print(free_port())')
.venv/bin/fewshot serve --models "$work/bundles" --port "$port" --state-dir "$work/state" --metrics-port "$metrics" \
  2>"$work/server.log" &
server=$!
.venv/bin/python -c "
import sys, time, grpc
ch = grpc.insecure_channel('127.0.0.1:$port')
grpc.channel_ready_future(ch).result(timeout=180)
"
.venv/bin/fewshot bench --target "127.0.0.1:$port" --sweep --seconds "$SECONDS_PER_LEVEL" \
  --metrics-url "http://127.0.0.1:$metrics/metrics" --out "$OUT"
