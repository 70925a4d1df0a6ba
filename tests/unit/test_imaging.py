"""Decoding hostile and unusual images: every mode to RGB, EXIF, bombs, broken files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from multitag.inference.imaging import (
    DecodedImage,
    ImageDecodeError,
    decodable_extensions,
    decode_image,
    fastai_resize,
    to_rgb,
)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None]
    a = np.stack(
        [np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), np.full((h, w), 128.0)], axis=-1
    )
    return Image.fromarray(a.astype(np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring a size, and no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_rgb_jpeg_keeps_size_and_returns_model_input() -> None:
    out = decode_image(encode(gradient(120, 80), "JPEG"), 32)
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height) == (120, 80)
    assert out.array.shape == (32, 32, 3) and out.array.dtype == np.uint8
    assert out.format == "JPEG" and out.mode == "RGB"


def test_exif_rotation_swaps_size_and_rotates_pixels() -> None:
    # Stored 60 wide x 30 high: left half red, right half blue. Orientation 6 means "rotate
    # 90 degrees clockwise to display": the left (red) half ends up on top.
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)

    out = decode_image(data, 20, resize_method="squish")

    assert (out.width, out.height) == (30, 60)
    top, bottom = out.array[:8].reshape(-1, 3).mean(0), out.array[-8:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue below


def test_cmyk_jpeg_becomes_the_right_colour() -> None:
    red = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    out = decode_image(encode(red, "JPEG", quality=95), 16)
    assert out.mode == "CMYK"
    r, g, b = out.array.reshape(-1, 3).mean(0)
    assert r > 230 and g < 30 and b < 30, (r, g, b)


def test_16bit_png_is_scaled_not_clipped() -> None:
    a = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    img = Image.fromarray(a)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    out = decode_image(data, 64, resize_method="squish")

    grey = out.array[..., 0].astype(int)
    assert np.array_equal(grey, out.array[..., 2])  # grey stays grey
    assert grey[:, 0].max() <= 2 and grey[:, -1].min() >= 253  # full range kept
    assert 118 <= grey[:, 32].mean() <= 138  # mid-grey, not clipped to white
    assert np.all(np.diff(grey[0]) >= 0)  # the ramp survives


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", np.array([[0, 32768], [65535, 65535]], np.int32), [0, 128, 255]),
        ("I", np.array([[-50, 0], [100, 100]], np.int32), [0, 85, 255]),  # stretched
        ("F", np.array([[0.0, 0.5], [1.0, 1.0]], np.float32), [0, 128, 255]),
        ("F", np.array([[-2.0, 0.0], [2.0, 2.0]], np.float32), [0, 128, 255]),  # stretched
    ],
)
def test_high_bit_depth_modes_scale_to_8_bits(
    mode: str, values: np.ndarray, expected: list[int]
) -> None:
    img = Image.fromarray(values, mode)
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (2, 2, 3)
    assert [int(rgb[0, 0, 0]), int(rgb[0, 1, 0]), int(rgb[1, 0, 0])] == expected


def test_32bit_tiff_decodes() -> None:
    img = Image.fromarray(np.full((20, 20), 65535, np.int32), "I")
    out = decode_image(encode(img, "TIFF"), 8)
    assert out.mode == "I" and int(out.array.min()) == 255


def test_palette_transparency_composites_on_white() -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    img.paste(1, (0, 0, 10, 20))  # left half red, right half index 0
    data = encode(img, "PNG", transparency=0)  # index 0 (black) is transparent

    out = decode_image(data, 20, resize_method="squish")

    assert out.mode == "P"
    assert tuple(out.array[10, 2]) == (255, 0, 0)
    assert tuple(out.array[10, 17]) == (255, 255, 255)  # transparent -> white, not black


def test_la_and_rgba_composite_and_background_is_configurable() -> None:
    la = Image.new("LA", (10, 10), (0, 0))  # black, fully transparent
    la.paste((0, 255), (0, 0, 5, 10))  # left half black, opaque
    out = decode_image(encode(la, "PNG"), 10, resize_method="squish")
    assert tuple(out.array[5, 1]) == (0, 0, 0)
    assert tuple(out.array[5, 8]) == (255, 255, 255)

    rgba = Image.new("RGBA", (10, 10), (0, 200, 0, 0))
    dark = decode_image(encode(rgba, "PNG"), 10, background=(0, 0, 0))
    assert int(dark.array.max()) == 0  # fully transparent green on black is black


def test_one_bit_image() -> None:
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (0, 0, 8, 16))
    out = decode_image(encode(img, "PNG"), 16, resize_method="squish")
    assert out.mode == "1"
    assert set(np.unique(out.array[:, :6])) == {255} and set(np.unique(out.array[:, 10:])) == {0}


def test_grey_png_with_transparent_value() -> None:
    img = Image.new("L", (10, 10), 7)
    out = decode_image(encode(img, "PNG", transparency=7), 10)
    assert int(out.array.min()) == 255  # every pixel transparent -> white


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(buf.getvalue())), "n_frames", 1) == 3

    out = decode_image(buf.getvalue(), 8)

    r, g, b = out.array.reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_mpo_camera_file_decodes_its_first_frame_and_is_listed_as_an_image() -> None:
    frames = [Image.new("RGB", (64, 48), c) for c in ((220, 20, 20), (20, 20, 220))]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(buf.getvalue())), "n_frames", 1) == 2

    out = decode_image(buf.getvalue(), 16)

    assert (out.format, out.width, out.height) == ("MPO", 64, 48)
    r, g, b = out.array.reshape(-1, 3).mean(0)
    assert r > 200 and g < 40 and b < 40  # the first (red) frame, not the blue one
    assert ".mpo" in decodable_extensions()


def test_decodable_extensions_are_those_of_the_allowed_formats_only() -> None:
    exts = decodable_extensions()
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".mpo"} <= exts
    assert not exts & {".pdf", ".eps", ".psd", ".fits", ".h5", ".ico", ".txt"}


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty"),
        (b"this is a text file, not a JPEG\n" * 3, "unrecognised"),
        (png_header_only(100_000, 100_000), "too_large"),
        (png_header_only(50, 50), "truncated"),
    ],
    ids=["zero-bytes", "text-named-jpg", "huge-declared-size", "header-without-pixels"],
)
def test_broken_files_raise_with_a_reason(data: bytes, kind: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, 32)
    assert info.value.kind == kind
    assert info.value.reason.startswith(f"{kind}: ") and len(info.value.reason) > len(kind) + 5


def test_truncated_jpeg_is_an_error_not_a_grey_image() -> None:
    data = encode(gradient(200, 200), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2], 32)
    assert info.value.kind == "truncated"
    assert "truncated" in info.value.reason.lower()


def test_pixel_limit_is_configurable() -> None:
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(ImageDecodeError, match="10000 pixels exceeds the limit of 5000"):
        decode_image(data, 16, max_pixels=5000)
    assert decode_image(data, 16, max_pixels=10_000).width == 100
    assert decode_image(data, 16, max_pixels=None).width == 100


def test_large_jpeg_is_drafted_and_close_to_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    requests: list[tuple[int, int] | None] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str | None, size: tuple[int, int] | None):  # type: ignore[no-untyped-def]
        requests.append(size)
        return real_draft(self, mode, size)

    data = encode(gradient(1600, 1200), "JPEG", quality=95)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    drafted = decode_image(data, 64)
    monkeypatch.undo()

    assert requests and requests[0] is not None  # draft was asked for a reduced size
    assert (drafted.width, drafted.height) == (1600, 1200)  # original size is still reported
    full = fastai_resize(Image.open(io.BytesIO(data)).convert("RGB"), 64)
    diff = np.abs(drafted.array.astype(int) - np.asarray(full).astype(int))
    assert diff.mean() < 2.0, diff.mean()


def _draft_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes JPEGs are decoded at, one per `draft` call (after the call)."""
    from PIL import JpegImagePlugin

    sizes: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str | None, size: tuple[int, int] | None):  # type: ignore[no-untyped-def]
        out = real_draft(self, mode, size)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return sizes


@pytest.mark.parametrize(
    ("w", "h", "target", "decoded_at"),
    [
        (2000, 1500, 224, (1000, 750)),  # phone photo: 1/2 scale, 3.3x the input left
        (4032, 3024, 224, (1008, 756)),  # 12 MP photo: 1/4 scale
        (1920, 1080, 224, None),  # 1/2 scale would leave 2.4x: decoded whole
        (560, 315, 64, None),  # the same shape at 64 px
        (500, 375, 224, None),  # VOC-sized: too small to scale down
    ],
)
def test_a_jpeg_is_scaled_down_only_while_3x_the_model_input_remains(
    monkeypatch: pytest.MonkeyPatch, w: int, h: int, target: int, decoded_at: tuple | None
) -> None:
    sizes = _draft_spy(monkeypatch)
    out = decode_image(encode(gradient(w, h), "JPEG", quality=90), target)
    assert (out.width, out.height, out.array.shape) == (w, h, (target, target, 3))
    if decoded_at is None:
        assert sizes in ([], [(w, h)])  # no draft asked, or one that kept the full size
    else:
        assert sizes == [decoded_at]


def test_draft_false_decodes_every_pixel_as_fastai_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact mode's decode: the same pixels as a full decode + fastai's validation resize,
    where the default decodes this photo at 1/4 scale and differs."""
    rng = np.random.default_rng(0)
    base = np.asarray(gradient(1600, 1200)).astype(np.int16)
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    data = encode(Image.fromarray(noisy), "JPEG", quality=90)
    sizes = _draft_spy(monkeypatch)
    exact = decode_image(data, 64, draft=False)
    assert sizes == []
    full = np.asarray(fastai_resize(Image.open(io.BytesIO(data)).convert("RGB"), 64))
    assert np.array_equal(exact.array, full)
    drafted = decode_image(data, 64)
    assert sizes == [(400, 300)] and not np.array_equal(drafted.array, full)


def test_small_jpeg_is_not_drafted(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    calls: list[object] = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda *a: calls.append(a))
    decode_image(encode(gradient(100, 80), "JPEG"), 64)
    assert calls == []


@pytest.mark.parametrize("method", ["crop", "squish", "pad"])
@pytest.mark.parametrize(("w", "h"), [(97, 61), (40, 90), (64, 64), (13, 200)])
def test_resize_matches_fastai_validation_resize_exactly(method: str, w: int, h: int) -> None:
    from fastai.vision.augment import Resize
    from fastai.vision.core import PILImage

    img = gradient(w, h)
    img.putpixel((w // 3, h // 4), (255, 0, 255))
    expected = Resize(32, method=method)(PILImage(img), split_idx=1)
    ours = fastai_resize(img, 32, method=method)  # type: ignore[arg-type]
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_unknown_resize_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown resize method"):
        decode_image(encode(gradient(10, 10), "PNG"), 8, resize_method="zoom")  # type: ignore[arg-type]
