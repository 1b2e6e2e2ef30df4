"""Image decoding: the format allow-list, every decoder failure as ImageError, pixel limits from headers."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageFile

from fewshot.models.preprocess import InputSpec
from fewshot.server.budget import CallBudget
from fewshot.server.errors import TooLarge
from fewshot.server.images import FORMATS, ImageError, ImageLimits, decode_batch, decode_image

pytestmark = pytest.mark.unit

SPEC = InputSpec(1, 28, (0.5,), (0.5,))


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt)
    return buf.getvalue()


def dds() -> bytes:
    """The 912-byte DDS of issue 13 (Pillow: NotImplementedError 'Unknown pixel format flags 0')."""
    return (
        b"DDS "
        + struct.pack("<7I", 124, 0x1007, 28, 28, 0, 0, 0)
        + bytes(44)
        + struct.pack("<8I", 32, 0, 0, 8, 0, 0, 0, 0)
        + bytes(20)
        + bytes(784)
    )


def ico_bomb(side: int = 9000) -> bytes:
    """An ICO whose one entry is a ``side`` x ``side`` PNG (~80 KB; Pillow decodes it while opening)."""
    png = encoded("PNG", (side, side))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def blp() -> bytes:
    """A malformed BLP (Pillow: BLPFormatError)."""
    return b"BLP1" + struct.pack("<5I", 9, 8, 28, 28, 0) + bytes(64)


def spider() -> bytes:
    """A SPIDER header that Pillow's plugin chokes on (it has no signature to refuse it by)."""
    header = np.zeros(256, dtype=">f4")
    header[[1, 2, 4, 11, 12, 22]] = [1, 28, 1, 28, 1, 1024]
    return header.tobytes() + bytes(28 * 28 * 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_allowed_format_decodes(fmt):
    assert decode_image(encoded(fmt, mode="L" if fmt != "JPEG" else "RGB"), SPEC).shape == (28, 28, 1)


@pytest.mark.parametrize(
    "data,name", [(dds(), "DDS"), (ico_bomb(), "ICO"), (blp(), "BLP"), (encoded("PCX"), "PCX"), (encoded("PPM"), "PPM")]
)
def test_formats_outside_the_allow_list_are_refused_by_name(data, name):
    with pytest.raises(ImageError, match=rf"in the {name} format, which this server does not accept"):
        decode_image(data, SPEC)


@pytest.mark.parametrize(
    "data", [spider(), b"\x89PNG\r\n\x1a\n" + bytes(40), encoded("PNG")[:60], encoded("JPEG", mode="RGB")[:200], encoded("TIFF")[:50]]
)
def test_malformed_images_are_image_errors(data):
    with pytest.raises(ImageError):
        decode_image(data, SPEC)


def test_no_plugin_decodes_while_checking_limits(monkeypatch):
    """Oversized images of every allowed format, and the ICO bomb, are refused without one pixel decoded."""

    def no_decoding(self):
        raise AssertionError(f"{self.format} pixels were decoded")

    limits = ImageLimits(max_bytes=64 << 20, max_pixels=1 << 20)
    images = {fmt: encoded(fmt, (1500, 1500), "L" if fmt != "JPEG" else "RGB") for fmt in FORMATS}
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for _fmt, data in images.items():
        with pytest.raises(ImageError, match="from its header, before decoding"):
            decode_image(data, SPEC, limits)
    with pytest.raises(ImageError, match="ICO format"):
        decode_image(ico_bomb(), SPEC, limits)


def test_a_calls_pixel_budget_is_charged_before_decoding(monkeypatch):
    images = [encoded("PNG", (1024, 1024))] * 5
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the budget check"))
    with pytest.raises(TooLarge, match="decoded pixels"):
        decode_batch(images, SPEC, ImageLimits(), "query", CallBudget(max_pixels=4 << 20))


def test_a_large_batch_decodes_in_two_threads_to_the_same_arrays_and_names_a_bad_image():
    from fewshot.models.preprocess import encode_png
    from fewshot.server.images import PARALLEL_FROM

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 1), dtype=np.uint8) for _ in range(PARALLEL_FROM + 5)]
    encoded = [encode_png(a) for a in images]
    batch = decode_batch(encoded, SPEC, ImageLimits(), "query")
    one_by_one = SPEC.normalize(np.stack([decode_image(b, SPEC) for b in encoded]))
    assert batch.shape == (len(images), 1, 28, 28) and np.array_equal(batch.numpy(), one_by_one.numpy())
    for bad in (3, len(images) - 2):  # in the first half, and in the half a helper thread decodes
        broken = list(encoded)
        broken[bad] = broken[bad][:40]  # header intact, pixel data cut
        with pytest.raises(ImageError, match=f"query image {bad} "):
            decode_batch(broken, SPEC, ImageLimits(), "query")


def test_libspng_decoding_checks_the_call_and_names_a_damaged_image():
    """PNGs of the model's own format go through libspng: an abandoned call stops before the first is decoded,
    and a PNG whose header passes but whose pixel data is damaged falls back to Pillow, whose error names the
    image."""
    from fewshot.models.preprocess import encode_png
    from fewshot.server.errors import CallAbandoned
    from fewshot.server.images import png_fast_header

    rng = np.random.default_rng(1)
    encoded = [encode_png(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)) for _ in range(6)]
    assert all(png_fast_header(b, SPEC) is not None for b in encoded)
    budget = CallBudget()
    budget.abandon()
    with pytest.raises(CallAbandoned, match="before decoding query image 0"):
        decode_batch(encoded, SPEC, ImageLimits(), "query", budget)
    damaged = bytearray(encoded[4])
    idat = damaged.index(b"IDAT")
    damaged[idat + 10 : idat + 20] = bytes(10)  # inside the compressed data: the chunk's CRC no longer matches
    broken = [*encoded[:4], bytes(damaged), encoded[5]]
    assert png_fast_header(broken[4], SPEC) is not None
    with pytest.raises(ImageError, match="query image 4 cannot be decoded"):
        decode_batch(broken, SPEC, ImageLimits(), "query")


def _pillow_only(data: bytes, spec: InputSpec) -> np.ndarray:
    """What Pillow alone makes of ``data`` (the reference of the libspng fast path)."""
    array = spec.prepare(Image.open(io.BytesIO(data)))
    return array[..., None] if array.ndim == 2 else array


def test_the_libspng_fast_path_gives_pillows_pixels(omniglot_test):
    """Real dataset images, resized ones, and PNGs the fast path must leave to Pillow (transparency,
    16-bit, palette, the other channel count): every batch equals Pillow's decoding exactly."""
    from fewshot.models.data import load_dataset
    from fewshot.models.preprocess import encode_png
    from fewshot.server.images import png_fast_header

    tiny = load_dataset("tinyimagenet", "test")
    rgb_spec, gray_spec = InputSpec.for_dataset("tinyimagenet"), InputSpec.for_dataset("omniglot")
    rng = np.random.default_rng(1)

    def png(array: np.ndarray, **save) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG", **save)
        return buf.getvalue()

    cases = {
        gray_spec: [encode_png(omniglot_test.images[i]) for i in range(20)] + [png(rng.integers(0, 256, (40, 33), dtype=np.uint8))],
        rgb_spec: [encode_png(tiny.images[i]) for i in range(20)]
        + [
            png(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
            png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), transparency=(1, 2, 3)),
            png(rng.integers(0, 256, (64, 64), dtype=np.uint8)),  # grayscale for an RGB model
            png(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)),
            png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), optimize=True, bits=4),
        ],
    }
    cases[gray_spec].append(png((rng.integers(0, 65535, (28, 28))).astype(np.uint16)))
    for spec, images in cases.items():
        fast = [png_fast_header(b, spec) is not None for b in images]
        assert all(fast[:20]) and not all(fast)  # the dataset PNGs take the fast path, the odd ones do not
        batch = decode_batch(images, spec, ImageLimits(), "query")
        expected = spec.normalize(np.stack([_pillow_only(b, spec) for b in images]))
        assert np.array_equal(batch.numpy(), expected.numpy())


def test_a_damaged_png_on_the_fast_path_is_an_image_error(omniglot_test):
    from fewshot.models.preprocess import encode_png

    good = encode_png(omniglot_test.images[0])
    damaged = good[:-30] + bytes(30)  # the header and chunk list intact, the image data not
    with pytest.raises(ImageError, match="query image 1 "):
        decode_batch([good, damaged], SPEC, ImageLimits(), "query")
