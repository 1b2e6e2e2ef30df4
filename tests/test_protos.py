"""The stubs the SDK ships are generated from the committed contract."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "protos/python/fewshot_proto"


def test_shipped_stubs_match_the_proto(tmp_path):
    subprocess.run(
        ["bash", "scripts/gen-protos.sh", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in ("fewshot_pb2.py", "fewshot_pb2.pyi", "fewshot_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (STUBS / name).read_text(), f"{name} is stale: run scripts/gen-protos.sh"
