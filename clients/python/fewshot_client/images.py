"""Conversion of the image types the SDK accepts into ``fewshot.v1.Image`` messages."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image as PILImage

from fewshot_proto import fewshot_pb2

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | PILImage.Image | np.ndarray

ACCEPTED = (
    "a file path (str or os.PathLike), encoded bytes (bytes, bytearray, memoryview), "
    "a PIL image, or a numpy array (H, W) or (H, W, C) of uint8, float32 or float64"
)


def to_image_proto(x: ImageLike) -> fewshot_pb2.Image:
    """One image as a ``fewshot_pb2.Image``.

    Paths and bytes are sent as they are (``encoded``), PIL images as lossless PNG, numpy arrays as
    a raw tensor: uint8 as ``"uint8"``, float32/float64 (values in 0..1) as little-endian ``"float32"``.

    Raises:
        TypeError: ``x`` is none of the accepted types, or an array of another dtype.
        ValueError: an array that is not 2- or 3-dimensional.
        OSError: a path that cannot be read.
    """
    if isinstance(x, (str, os.PathLike)):
        with open(x, "rb") as f:
            return fewshot_pb2.Image(encoded=f.read())
    if isinstance(x, (bytes, bytearray, memoryview)):
        return fewshot_pb2.Image(encoded=bytes(x))
    if isinstance(x, PILImage.Image):
        return fewshot_pb2.Image(encoded=_png(x))
    if isinstance(x, np.ndarray):
        return fewshot_pb2.Image(tensor=_raw_tensor(x))
    raise TypeError(f"cannot send {type(x).__name__} as an image; expected {ACCEPTED}")


def _png(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    try:
        image.save(buf, format="PNG")
    except OSError as err:
        raise TypeError(f"a PIL image of mode {image.mode} cannot be encoded as PNG; convert it to L, RGB or RGBA first") from err
    return buf.getvalue()


def _raw_tensor(array: np.ndarray) -> fewshot_pb2.RawTensor:
    if array.ndim not in (2, 3):
        raise ValueError(f"an image array must have shape (H, W) or (H, W, C), got {array.shape}")
    if array.dtype == np.uint8:
        dtype, data = "uint8", np.ascontiguousarray(array)
    elif array.dtype.kind == "f" and array.dtype.itemsize in (4, 8):
        dtype, data = "float32", np.ascontiguousarray(array, dtype="<f4")
    else:
        raise TypeError(f"cannot send an array of dtype {array.dtype} as an image; expected {ACCEPTED}")
    return fewshot_pb2.RawTensor(shape=list(array.shape), dtype=dtype, data=data.tobytes())
