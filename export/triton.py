"""Triton model repository entries for exported bundles (``fewshot export --triton-repo DIR``)."""

from __future__ import annotations

import shutil
from pathlib import Path

MAX_BATCH_SIZE = 256
QUEUE_DELAY_US = 2000


def backbone_model_name(name: str) -> str:
    """Triton model name of a bundle's backbone: ``<name>_backbone``."""
    return f"{name}_backbone"


def network_model_name(name: str) -> str:
    """Triton model name of an inner-loop bundle's adapted network (``network.onnx``): ``<name>_network``."""
    return f"{name}_network"


def backbone_config(name: str, channels: int, size: int, feature_dim: int) -> str:
    """``config.pbtxt`` for ``backbone.onnx``: batch axis managed by Triton (``max_batch_size``), so the
    dims exclude it; dynamic batching merges concurrent requests; ``KIND_AUTO`` places instances on
    a GPU when present, else on the CPU."""
    return f'''name: "{backbone_model_name(name)}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{
    name: "images"
    data_type: TYPE_FP32
    dims: [ {channels}, {size}, {size} ]
  }}
]
output [
  {{
    name: "features"
    data_type: TYPE_FP32
    dims: [ {feature_dim} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
'''


def write_backbone_model(repo: Path, name: str, onnx_path: Path, channels: int, size: int, feature_dim: int) -> Path:
    """Write ``repo/<name>_backbone/{config.pbtxt, 1/model.onnx}``; returns the model folder."""
    folder = Path(repo) / backbone_model_name(name)
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(backbone_config(name, channels, size, feature_dim))
    return folder
