"""Property-based fuzzing (hypothesis) of image decoding, raw tensors and request validation.

Only documented errors may escape: :class:`ImageError` (and the pixel budget's ``TooLarge``) in process,
and over real gRPC only the statuses of the error table (docs/errors-and-security.md), never INTERNAL or UNKNOWN. The suite
runs 6,000 examples (derandomised, so CI is repeatable); ``FEWSHOT_FUZZ_SCALE=20`` runs 20 times as many
with fresh randomness.
"""

from __future__ import annotations

import io
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fewshot.models.preprocess import InputSpec
from fewshot.server.budget import CallBudget
from fewshot.server.errors import TooLarge
from fewshot.server.images import FORMATS, ImageError, ImageLimits, decode_batch, decode_image
from fewshot.server.service import STATUSES
from fewshot_proto import fewshot_pb2 as pb

SCALE = int(os.environ.get("FEWSHOT_FUZZ_SCALE", "1"))
SPEC = InputSpec(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)


def fuzz(examples: int):
    return settings(
        max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None, suppress_health_check=list(HealthCheck)
    )


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for fmt in FORMATS:
        for mode in ("L", "RGB"):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (12, 9) if mode == "L" else (12, 9, 3), dtype=np.uint8), mode).save(buf, fmt)
            out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        out = decode_image(data, SPEC, LIMITS)
    except ImageError:
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.unit
@fuzz(1500)
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_image_error(data):
    _decodes_or_refuses(data)


@pytest.mark.unit
@fuzz(2500)
@given(mutated_images())
def test_mutated_images_decode_or_raise_image_error(data):
    _decodes_or_refuses(data)


@pytest.mark.unit
@fuzz(1000)
@given(
    shape=st.lists(st.integers(-3, 70), max_size=4),
    dtype=st.sampled_from(["uint8", "float32", "float64", "", "int8"]),
    data=st.binary(max_size=4 * 40 * 40 * 3),
    fill=st.none() | st.floats(allow_nan=True, allow_infinity=True, width=32),
)
def test_raw_tensors_decode_or_raise_image_error(shape, dtype, data, fill):
    if fill is not None and dtype == "float32" and shape and all(s > 0 for s in shape):
        data = np.full(int(np.prod(shape)), fill, dtype=np.float32).tobytes()
    image = pb.Image(tensor=pb.RawTensor(shape=shape, dtype=dtype, data=data))
    try:
        out = decode_batch([image], SPEC, LIMITS, "query", CallBudget(max_pixels=1 << 16))
    except (ImageError, TooLarge):
        return
    assert out.shape == (1, 3, 32, 32) and bool(np.isfinite(out.numpy()).all())


def _valid_requests() -> list[tuple[str, bytes]]:
    png = SEEDS[0]
    support = [pb.LabelledImage(image=pb.Image(encoded=png), label=f"c{i % 2}") for i in range(4)]
    return [
        ("Adapt", pb.AdaptRequest(model="omniglot-conv4-directsum", support=support).SerializeToString()),
        (
            "Adapt",
            pb.AdaptRequest(
                model="omniglot-conv4-directsum",
                method="laplacianshot",
                support=support,
                settings=pb.AdaptSettings(**{"lambda": 0.5}),
                ttl_seconds=60,
            ).SerializeToString(),
        ),
        ("Classify", pb.ClassifyRequest(task_id="0" * 32, queries=[pb.Image(encoded=png)], top_k=2).SerializeToString()),
        (
            "Classify",
            pb.ClassifyRequest(
                task_id="0" * 32, queries=[pb.Image(encoded=png)], reject_unknown=True, target_recall=0.9
            ).SerializeToString(),
        ),
        (
            "UpdateTask",
            pb.UpdateTaskRequest(task_id="ef" * 16, add=support[:1], remove_labels=["c1"], expected_version=1).SerializeToString(),
        ),
        ("GetTask", pb.GetTaskRequest(task_id="ab" * 16).SerializeToString()),
        ("DeleteTask", pb.DeleteTaskRequest(task_id="cd" * 16).SerializeToString()),
        ("ListModels", b""),
    ]


VALID = _valid_requests()
DOCUMENTED = STATUSES - {grpc.StatusCode.INTERNAL}


@st.composite
def mutated_requests(draw) -> tuple[str, bytes]:
    method, raw = draw(st.sampled_from(VALID))
    if draw(st.integers(0, 9)) == 0:
        return method, draw(st.binary(max_size=256))
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return method, bytes(data)


@pytest.fixture(scope="module")
def raw_channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@fuzz(1000)
@given(mutated_requests())
def test_mutated_requests_get_documented_statuses(raw_channel, request_):
    method, raw = request_
    try:
        raw_channel.unary_unary(f"/fewshot.v1.FewShot/{method}")(raw, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in DOCUMENTED, (method, raw[:80], err.code(), err.details())
        assert err.details(), (method, err.code())
