"""Decoding request images into a model's input, exactly as training and ``fewshot eval`` prepare them.

An image arrives as encoded bytes in one of :data:`FORMATS` or as a raw tensor ``(H, W)`` / ``(H, W, C)``
of ``uint8`` (0..255) or ``float32`` (0..1). Both become ``(size, size, channels)`` float32 arrays in
0..255 via :meth:`InputSpec.prepare` (the same conversion and resize as the data loaders), then
:meth:`InputSpec.normalize` gives the network input. Only the plugins of :data:`FORMATS` are ever
run on request bytes (Pillow's other plugins are many and some decode while opening, e.g. ICO), and
the pixel limits are checked on the header before any pixel is decoded, so a decompression bomb costs
a header read. Every decoder failure becomes :class:`ImageError` (INVALID_ARGUMENT).

PNGs already in the model's pixel format (8-bit grayscale for a 1-channel model, 8-bit RGB for a
3-channel one, no transparency chunk), the common case, are decoded by libspng (``pyspng``): the same
pixels as Pillow (tested), 2-15x faster (BENCHMARKS.md); any other image, and any PNG libspng refuses,
goes through Pillow.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

try:  # libspng: the fast path for PNGs in the model's own pixel format; Pillow decodes everything else
    import pyspng
except ImportError:  # pragma: no cover - a platform without its wheel decodes with Pillow alone
    pyspng = None

from fewshot.errors import FewShotError, one_line
from fewshot.models.preprocess import InputSpec
from fewshot.server.budget import CallBudget
from fewshot.server.errors import InvalidRequest
from fewshot_proto import fewshot_pb2 as pb

if TYPE_CHECKING:
    from fewshot.models.family import Family


class ImageError(FewShotError, ValueError):
    """An image the server cannot accept; the message says which image, what is wrong and what is allowed."""


#: Encoded formats accepted (Pillow format ids): the formats cameras, browsers and image libraries
#: write (Pillow's JPEG plugin also opens phones' multi-picture JPEGs). Anything else is refused by name.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_ACCEPTED = "PNG, JPEG, WebP, BMP, GIF or TIFF"
Image.init()  # registers every plugin, so the allow-list and the signature checks see them all


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits: encoded size in bytes and decoded pixel count (width x height)."""

    max_bytes: int = 8 << 20
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = FORMATS


def sniff_format(data: bytes) -> str | None:
    """The Pillow format whose signature ``data`` starts with (only signature checks run: no plugin
    opens the bytes), or ``None``."""
    prefix = data[:64]
    for name in Image.ID:
        accept = Image.OPEN.get(name, (None, None))[1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a signature check that cannot read this prefix: not that format
            continue
    return None


RAW_DTYPES = {"uint8": np.uint8, "float32": np.float32}


def _from_pil(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """uint8 ``(size, size, channels)`` (normalisation converts the stacked batch once)."""
    array = spec.prepare(image)
    return array[..., None] if array.ndim == 2 else array


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow's warnings off while a request's images are decoded (a damaged file's warnings say nothing
    the error will not), a decompression-bomb warning made an error. Entered once per call, not per
    image: ``catch_warnings`` swaps the process's filter list, which cost more than decoding a small PNG."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


@contextmanager
def _decoder_errors(data: bytes, limits: ImageLimits) -> Iterator[None]:
    """Map whatever Pillow raises on ``data`` to :class:`ImageError`: every decoder failure is the
    image's fault, never the server's."""
    try:
        yield
    except (ImageError, InvalidRequest):
        raise
    except Image.UnidentifiedImageError:
        found = sniff_format(data)
        if found is not None and found not in limits.formats:
            raise ImageError(f"is in the {found} format, which this server does not accept; send {_ACCEPTED}") from None
        raise ImageError(f"is not a readable image; send {_ACCEPTED}") from None
    except Exception as exc:
        raise ImageError(f"cannot be decoded ({type(exc).__name__}: {one_line(str(exc), 200)}); send {_ACCEPTED}") from None


def _open_encoded(data: bytes, limits: ImageLimits, spec: InputSpec | None = None) -> Image.Image | PngHeader:
    """``data`` opened by the allowed plugins only (or, given ``spec``, its PNG header read for the fast
    path): its header read and its size checked, no pixel decoded."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"is {len(data)} bytes encoded; at most {limits.max_bytes} are allowed")
    if not data:
        raise ImageError(f"is empty: send encoded bytes ({_ACCEPTED}) or a raw tensor")
    fast = png_fast_header(data, spec) if spec is not None and "PNG" in limits.formats else None
    if fast is not None:
        image: Image.Image | PngHeader = fast
    else:
        with _decoder_errors(data, limits):
            image = Image.open(io.BytesIO(data), formats=limits.formats)
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"is {width}x{height} pixels; at most {limits.max_pixels} pixels are allowed (refused from its header, before decoding)"
        )
    return image


@dataclass(frozen=True)
class PngHeader:
    """The IHDR of a PNG that the fast path decodes: its ``size`` (width, height) as Pillow reports it."""

    size: tuple[int, int]


#: The PNG signature and the start of its first chunk, which must be a 13-byte IHDR.
_PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
#: IHDR colour types by model channels: 0 (grayscale) for 1-channel models, 2 (RGB) for 3-channel ones.
_PNG_COLOUR = {1: 0, 3: 2}
_CHUNK_HEADER = struct.Struct(">I4s")  # a chunk's data length and type
_IHDR_SIZE = struct.Struct(">II")  # width, height


def png_fast_header(data: bytes, spec: InputSpec) -> PngHeader | None:
    """The header of ``data`` if it is a PNG that libspng decodes to exactly what Pillow would give
    ``spec`` (8-bit, the spec's colour type, no ``tRNS`` chunk before the image data), else ``None``."""
    if pyspng is None or len(data) < 33 or not data.startswith(_PNG_START):
        return None
    if data[24] != 8 or data[25] != _PNG_COLOUR.get(spec.channels):
        return None
    pos, last = 33, len(data) - 8  # after the IHDR chunk: walk the chunk headers up to the first IDAT
    while pos <= last:
        length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == b"IDAT":
            return PngHeader(_IHDR_SIZE.unpack_from(data, 16))
        if kind == b"tRNS":
            return None
        pos += 12 + length
    return None


def _decode_png_fast(header: PngHeader, data: bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """libspng's pixels (resized as :meth:`InputSpec.prepare` would); a PNG it refuses goes to Pillow."""
    try:
        array = pyspng.load(data)
    except Exception:  # damaged or unusual: Pillow decodes it, or says what is wrong with it
        return _decode_encoded(data, spec, limits)
    if header.size != (spec.size, spec.size):
        with _decoder_errors(data, limits):
            return _from_pil(Image.fromarray(array.reshape(array.shape[:2]) if spec.channels == 1 else array), spec)
    return array.reshape(spec.size, spec.size, spec.channels)


def _decode_opened(image: Image.Image | PngHeader, data: bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    if isinstance(image, PngHeader):
        return _decode_png_fast(image, data, spec, limits)
    with _decoder_errors(data, limits):
        return _from_pil(image, spec)


def _decode_encoded(data: bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """Through Pillow (the fast path's fallback, and single images)."""
    return _decode_opened(_open_encoded(data, limits), data, spec, limits)


def _resize_float(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a float (H, W, C) array channel by channel in Pillow's 32-bit float mode."""
    from fewshot.models.preprocess import _RESAMPLE

    planes = [
        np.asarray(Image.fromarray(array[..., c], mode="F").resize((spec.size, spec.size), _RESAMPLE[spec.resize]))
        for c in range(array.shape[-1])
    ]
    return np.stack(planes, axis=-1).astype(np.float32)


def _decode_raw(t: pb.RawTensor, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    if t.dtype not in RAW_DTYPES:
        raise ImageError(f"has raw dtype {t.dtype!r}; use 'uint8' (0..255) or 'float32' (0..1)")
    shape = tuple(int(s) for s in t.shape)
    if len(shape) not in (2, 3) or any(s <= 0 for s in shape):
        raise ImageError(f"has raw shape {list(shape)}; use (H, W) or (H, W, C) with positive sizes")
    height, width = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    if height * width > limits.max_pixels:
        raise ImageError(f"is {width}x{height} pixels; at most {limits.max_pixels} pixels are allowed")
    if channels != spec.channels:
        raise ImageError(
            f"has {channels} channels; this model takes {spec.channels}-channel images "
            f"(raw shape (H, W{', 3' if spec.channels == 3 else ''}))"
        )
    dtype = np.dtype(RAW_DTYPES[t.dtype]).newbyteorder("<")
    expected = height * width * channels * dtype.itemsize
    if len(t.data) != expected:
        raise ImageError(f"has {len(t.data)} data bytes; shape {list(shape)} of {t.dtype} needs {expected}")
    array = np.frombuffer(t.data, dtype=dtype).reshape(height, width, channels)
    if t.dtype == "float32":
        if not np.isfinite(array).all():
            raise ImageError("holds NaN or Inf values; float32 pixels must be finite, in 0..1")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(f"has float32 values in {array.min():.3g}..{array.max():.3g}; they must lie in 0..1")
        array = array.astype(np.float32) * 255.0
        return array if (height, width) == (spec.size, spec.size) else _resize_float(array, spec)
    if (height, width) == (spec.size, spec.size):
        return array.astype(np.float32)
    return _from_pil(Image.fromarray(array[..., 0] if channels == 1 else array), spec)


def _decode_one(image: pb.Image | bytes, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """:func:`decode_image` inside the caller's :func:`_quiet_pillow`: uint8 for encoded images,
    float32 for raw float tensors."""
    if isinstance(image, bytes):
        return _decode_encoded(image, spec, limits)
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return _decode_encoded(image.encoded, spec, limits)
    if kind == "tensor":
        return _decode_raw(image.tensor, spec, limits)
    raise ImageError("carries no data: set `encoded` or `tensor`")


def decode_image(image: pb.Image | bytes, spec: InputSpec, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """One request image (a ``pb.Image``, or encoded bytes as the Triton models receive them) -> float32
    ``(size, size, channels)`` in 0..255 (raises :class:`ImageError`)."""
    with _quiet_pillow():
        return _decode_one(image, spec, limits).astype(np.float32)


def _encoded_bytes(image: pb.Image | bytes) -> bytes | None:
    if isinstance(image, bytes):
        return image
    return image.encoded if image.WhichOneof("data") == "encoded" else None


def decode_batch(
    images: Sequence[pb.Image | bytes], spec: InputSpec, limits: ImageLimits, what: str, budget: CallBudget | None = None
) -> torch.Tensor:
    """Request images -> normalised ``(N, C, size, size)`` float32; errors name the image's index.

    Every encoded image is opened once, its header read and checked, before any is decoded; with
    ``budget``, the call's pixels (headers, raw tensors' shapes) are then charged, and its liveness is
    checked before each image is decoded."""
    return spec.normalize(decode_pixels(images, spec, limits, what, budget))


def decode_pixels(
    images: Sequence[pb.Image | bytes], spec: InputSpec, limits: ImageLimits, what: str, budget: CallBudget | None = None
) -> np.ndarray:
    """:func:`decode_batch` before normalisation: ``(N, size, size, C)`` pixels in 0..255, uint8 when every
    image was encoded or a uint8 tensor, else float32 (``spec.normalize`` of it is what :func:`decode_batch` gives)."""
    with _quiet_pillow():
        return _decode_batch(images, spec, limits, what, budget)


def _decode_batch(
    images: Sequence[pb.Image | bytes], spec: InputSpec, limits: ImageLimits, what: str, budget: CallBudget | None
) -> np.ndarray:
    encoded = [_encoded_bytes(image) for image in images]  # read once: a message's bytes field is a fresh copy
    opened: list[Image.Image | PngHeader | None] = []
    for i, data in enumerate(encoded):
        try:
            opened.append(None if data is None else _open_encoded(data, limits, spec))
        except ImageError as exc:
            raise ImageError(f"{what} image {i} {exc}") from None
    if budget is not None:
        budget.charge_pixels(sum(o.size[0] * o.size[1] if o is not None else _raw_pixels(image) for o, image in zip(opened, images)))

    def decode(i: int) -> np.ndarray:
        header, data = opened[i], encoded[i]
        if budget is not None:
            budget.check(f"decoding {what} image {i}")
        try:
            if header is None or data is None:  # a raw tensor
                return _decode_one(images[i], spec, limits)
            return _decode_opened(header, data, spec, limits)
        except ImageError as exc:
            raise ImageError(f"{what} image {i} {exc}") from None

    arrays: list[np.ndarray | None] = [None] * len(images)
    slow = [i for i, header in enumerate(opened) if not isinstance(header, PngHeader)]
    for i, header in enumerate(opened):  # libspng's images (microseconds each) in this thread
        if isinstance(header, PngHeader):
            arrays[i] = decode(i)
    if len(slow) < PARALLEL_FROM:
        for i in slow:
            arrays[i] = decode(i)
    else:  # Pillow's decoders release the GIL: the second half decodes on another core meanwhile
        half = len(slow) // 2
        second = _decode_pool().submit(lambda: [decode(i) for i in slow[half:]])
        try:
            for i in slow[:half]:
                arrays[i] = decode(i)
        except BaseException:
            wait([second])  # the helper is done with this call's images before the error is reported
            raise
        for i, array in zip(slow[half:], second.result()):
            arrays[i] = array
    return np.stack([a for a in arrays if a is not None])  # every index was decoded above


#: Images per call from which decoding is split over two threads.
PARALLEL_FROM = 16
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    """The process's decoding helpers (2 threads, made on first use)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(2, thread_name_prefix="fewshot-decode"))
        return _POOL[0]


def _raw_pixels(image: pb.Image | bytes) -> int:
    """Width x height of a raw tensor by its shape (0 for anything else; decoding reports problems)."""
    if isinstance(image, bytes) or image.WhichOneof("data") != "tensor" or len(image.tensor.shape) < 2:
        return 0
    return max(int(image.tensor.shape[0]), 0) * max(int(image.tensor.shape[1]), 0)


def decode_for_model(
    images: Sequence[pb.Image | bytes], model: Family, limits: ImageLimits, what: str, budget: CallBudget | None = None
) -> torch.Tensor:
    """:func:`decode_batch` for ``model``'s input; a bad image raises :class:`InvalidRequest` naming the
    image and the input the model takes."""
    return model.spec.normalize(decode_pixels_for_model(images, model, limits, what, budget))


def decode_pixels_for_model(
    images: Sequence[pb.Image | bytes], model: Family, limits: ImageLimits, what: str, budget: CallBudget | None = None
) -> np.ndarray:
    """:func:`decode_pixels` for ``model``'s input (what a task keeps of its support images for UpdateTask)."""
    try:
        return decode_pixels(images, model.spec, limits, what, budget)
    except ImageError as exc:
        raise InvalidRequest(
            f"{exc} (model {model.name} takes {model.spec.channels}-channel images, resized to {model.spec.size}x{model.spec.size})"
        ) from None
