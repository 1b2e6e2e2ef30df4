#!/usr/bin/env bash
# Entrypoint of the deployment image: optionally exports missing bundles, then replaces itself with
# `fewshot serve` (exec: the server takes this script's PID, 1 in a container, and receives the
# container's SIGTERM itself, which stops it gracefully).
#
# Usage: entrypoint.sh [serve] [EXTRA SERVE ARGS...]   export what FEWSHOT_EXPORT asks, then serve
#        entrypoint.sh export                           only export what FEWSHOT_EXPORT asks, then exit
#
# Settings (environment):
#   FEWSHOT_MODELS           bundle directory                          (/var/lib/fewshot/bundles)
#   FEWSHOT_PORT             gRPC port                                 (50051)
#   FEWSHOT_METRICS_PORT     Prometheus port, 0 for none               (9090)
#   FEWSHOT_STATE_DIR        task store directory                      (/var/lib/fewshot/state)
#   FEWSHOT_STORE            task database URL instead (postgresql://...); read by `fewshot serve`
#                            itself, so a password in it never reaches a command line
#   FEWSHOT_DEVICE           auto | cpu | cuda                         (auto)
#   FEWSHOT_THREADS          torch / ONNX Runtime threads, 0 = library default (0)
#   FEWSHOT_WORKERS          worker threads                            (4)
#   FEWSHOT_FEATURE_BACKEND  onnxruntime | triton                      (onnxruntime)
#   FEWSHOT_TRITON_URL       Triton's gRPC HOST:PORT                   (triton:8001)
#   FEWSHOT_TOKEN            bearer token; read by `fewshot serve` itself, never put on a command line
#   FEWSHOT_EXPORT           shipped model names (space or comma separated) to export when their
#                            bundle is missing; needs the datasets at FEWSHOT_DATA for the parity check
#   FEWSHOT_TRITON_REPO      with FEWSHOT_EXPORT: also write the Triton repository there
#   FEWSHOT_DRY_RUN=1        print the commands instead of running them
set -euo pipefail

MODELS=${FEWSHOT_MODELS:-/var/lib/fewshot/bundles}
DRY_RUN=${FEWSHOT_DRY_RUN:-0}

run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        local line
        line=$(printf '%q ' "$@")
        echo "${line% }"
    else
        "$@"
    fi
}

# Export every model of FEWSHOT_EXPORT whose bundle (or, with FEWSHOT_TRITON_REPO, Triton model) is missing.
export_missing() {
    local name missing=()
    for name in ${FEWSHOT_EXPORT//,/ }; do
        if [[ ! -f "$MODELS/$name/manifest.json" ]] ||
            [[ -n "${FEWSHOT_TRITON_REPO:-}" && ! -d "$FEWSHOT_TRITON_REPO/${name}_backbone" ]]; then
            missing+=(--model "$name")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    local args=(fewshot export "${missing[@]}" --out "$MODELS")
    if [[ -n "${FEWSHOT_TRITON_REPO:-}" ]]; then
        args+=(--triton-repo "$FEWSHOT_TRITON_REPO")
    fi
    run "${args[@]}"
}

mode=serve
if [[ $# -gt 0 && ( "$1" == serve || "$1" == export ) ]]; then
    mode=$1
    shift
fi
if [[ -n "${FEWSHOT_EXPORT:-}" ]]; then
    export_missing
elif [[ "$mode" == export ]]; then
    echo "entrypoint.sh export: set FEWSHOT_EXPORT to the model names to export" >&2
    exit 2
fi
if [[ "$mode" == export ]]; then
    exit 0
fi

serve=(fewshot serve --host 0.0.0.0 --port "${FEWSHOT_PORT:-50051}" --models "$MODELS"
    --state-dir "${FEWSHOT_STATE_DIR:-/var/lib/fewshot/state}" --metrics-port "${FEWSHOT_METRICS_PORT:-9090}"
    --device "${FEWSHOT_DEVICE:-auto}" --threads "${FEWSHOT_THREADS:-0}" --workers "${FEWSHOT_WORKERS:-4}"
    --feature-backend "${FEWSHOT_FEATURE_BACKEND:-onnxruntime}")
if [[ "${FEWSHOT_FEATURE_BACKEND:-onnxruntime}" == triton ]]; then
    serve+=(--triton-url "${FEWSHOT_TRITON_URL:-triton:8001}")
fi
if [[ "$DRY_RUN" == 1 ]]; then
    run "${serve[@]}" "$@"
    exit 0
fi
exec "${serve[@]}" "$@"
