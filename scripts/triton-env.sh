#!/usr/bin/env bash
# Usage: scripts/triton-env.sh [VENV] (default .venv-triton). Creates or updates the virtual environment
# that runs a real Triton server for the tests (`make test-triton`): the `tritonserver` binary
# (python backend only) carried by the nvidia-pytriton wheel, and what the python-backend models
# import (this repository, torch, ONNX Runtime). It is separate from .venv because Triton's python
# backend needs numpy<2 (with numpy 2 its response tensors come back empty) and pytriton pins
# tritonclient~=2.50. A stamp records what was installed; a second run with nothing changed takes
# well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-triton}
PYTHON=${PYTHON:-python3}
# torch is pinned to the CPU build that pip finds locally (../shared/ENVIRONMENT.md): a plain `torch`
# would pull several GB of CUDA wheels. One resolver run with this repository (editable, so the
# python-backend models import the working tree's `fewshot`) keeps numpy<2 and this repository's
# protobuf pin together.
REQUIREMENTS=("numpy<2" "torch==2.13.0" "onnxruntime" "nvidia-pytriton==0.7.0")
STAMP="$VENV/.installed-stamp"
fingerprint=$( { printf '%s\n' "${REQUIREMENTS[@]}"; cat "$0" pyproject.toml protos/python/pyproject.toml clients/python/pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" && -x "$VENV/bin/python" ]]; then
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# pip's notes about local index folders lacking a package are noise here; real errors still show.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQUIREMENTS[@]}" -e protos/python -e clients/python -e . \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -m pip check --disable-pip-version-check
"$VENV/bin/python" -c "import numpy, torch, onnxruntime, pytriton, fewshot.server.tasks; assert numpy.__version__ < '2', numpy.__version__"
echo "$fingerprint" > "$STAMP"
echo "$VENV ready: $("$VENV/bin/python" -c 'import numpy, torch, onnxruntime; print("numpy", numpy.__version__, "torch", torch.__version__, "onnxruntime", onnxruntime.__version__)')"
