#!/usr/bin/env bash
# Usage: scripts/gen-protos.sh [OUT_DIR]. Regenerates the Python stubs of protos/fewshot/v1/fewshot.proto into the wire package protos/python (fewshot_proto), which the client SDK and the server both depend on
# (one package, so the descriptor is registered once).
# Use the grpcio-tools of the venv that runs them: stubs made for protobuf 7 fail under 6.x.
set -euo pipefail
PY=${PY:-.venv/bin/python}
out=${1:-protos/python/fewshot_proto}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m grpc_tools.protoc -I protos --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" fewshot/v1/fewshot.proto
# protoc writes `from fewshot.v1 import fewshot_pb2`; the stubs live in fewshot_proto instead.
sed -i 's/^from fewshot\.v1 import fewshot_pb2/from fewshot_proto import fewshot_pb2/' "$tmp/fewshot/v1/fewshot_pb2_grpc.py"
cp "$tmp"/fewshot/v1/fewshot_pb2.py "$tmp"/fewshot/v1/fewshot_pb2.pyi "$tmp"/fewshot/v1/fewshot_pb2_grpc.py "$out/"
echo "stubs written to $out"
