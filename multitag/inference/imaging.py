"""Turn the bytes of any image a bucket may hold into exactly what the model saw in validation.

Why this module exists: real folders hold phone photos with EXIF rotation, CMYK print files,
16-bit scans, palette PNGs with transparency, animated GIFs, truncated uploads and files that
are not images at all. Every one of them must either become a model input prepared the way
fastai prepared validation images, or a specific, recorded reason; never a crashed run.

Choices (and why):
- EXIF orientation is applied (`ImageOps.exif_transpose`), so width/height and pixels are the
  upright image a person sees. (fastai's `PILImage.create` does not do this; photos straight
  from cameras would otherwise be scored sideways.)
- Transparency is composited on WHITE: most transparent images (logos, product cut-outs,
  icons) are designed to sit on a white page, and dark artwork on black would vanish.
  `background=` changes it.
- 16-bit and 32-bit grey values are scaled to 8 bits (65535 -> 255), never clipped: Pillow's
  own `convert("RGB")` clips I;16 at 255, which turns most 16-bit scans pure white.
- Multi-frame files (GIF, APNG, TIFF pages, MPO) use the first frame.
- JPEGs much larger than the model input are decoded at 1/2, 1/4 or 1/8 scale (`draft`),
  keeping at least `DRAFT_OVERSAMPLE` x the model resolution so the final bilinear resize
  still averages over enough pixels. Decoding a 2000x1500 photo for a 224 px model takes
  half the time (1/2 scale). `draft=False` decodes every pixel: fastai's own pixels, for
  the exact fp32 mode.
- A pixel-count limit (declared size, checked before any pixel is decoded) stops
  decompression bombs; `max_pixels=None` leaves only Pillow's own global guard.
- The final resize replicates fastai's validation `Resize(size, method)` exactly (centre
  crop for 'crop', whole image for 'squish', padding for 'pad'), bilinear, so scores match
  what the model was validated on.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from multitag.errors import InputError

ResizeMethod = Literal["crop", "squish", "pad"]
PadMode = Literal["reflection", "zeros", "border"]

# Pillow's default warning limit (~89.5 MP, a 9459x9459 image): 268 MB as RGB. Raise it for
# gigapixel scans on purpose, not by accident.
DEFAULT_MAX_PIXELS = 89_478_485
# Why 3, not 2: the DCT-scaled decode is a small box filter ahead of the final bilinear
# resize, and when that resize shrinks by less than ~3x the box is a visible part of the
# result. Measured (benchmarks/RESULTS.md, session 6) with a partly trained 64 px model whose
# scores crowd its threshold, fp32 decisions vs fastai's full decode, by the shrink left on
# the smaller side: 2.4x 99.50%, 2.9x 99.50%, 3.0-4x 99.75-99.83%, 5.9x 100%; full decode
# 100%. With 3, 2000x1500 and 4032x3024 photos still decode at 1/2 and 1/4 scale for 224 px
# models; 1920x1080 ones are decoded whole (75 instead of 117 img/s on one core).
DRAFT_OVERSAMPLE = 3
WHITE = (255, 255, 255)

# Only plugins for raster photo/graphics formats: fewer parsers exposed to hostile bytes, and
# no format that needs external programs (EPS -> Ghostscript) or is not a picture (FITS, HDF5).
# (MPO camera files open through the JPEG plugin.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "AVIF")
# What a listing counts as an image: the formats above plus MPO, by Pillow's own registry of
# extensions, so listing and decoding never disagree (an .mpo was once silently left out).
_LISTED_FORMATS = (*ALLOWED_FORMATS, "MPO")

# Exceptions Pillow's decoders raise on malformed input (seen in its fuzzing reports): these
# mean "this file is broken", not "the program is broken", so they become error rows.
_CORRUPT_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
)

_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_PLAIN_MODES = {"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageDecodeError(InputError):
    """A file that cannot become a model input; `kind` groups reasons for run statistics.

    kinds: empty, unrecognised, too_large, truncated, corrupt, unsupported_mode.
    """

    def __init__(self, kind: str, message: str) -> None:
        message = " ".join(message.split())  # one line: it becomes a Parquet cell and a log line
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    @property
    def reason(self) -> str:
        """The text recorded in the `error` column of the tags output."""
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class DecodedImage:
    """A model-ready image plus the facts about the original that the output records."""

    array: np.ndarray  # uint8 (size, size, 3), RGB, resized like fastai's validation Resize
    width: int  # original width after EXIF rotation
    height: int  # original height after EXIF rotation
    format: str  # Pillow format name of the file (JPEG, PNG ...)
    mode: str  # Pillow mode of the file before conversion to RGB


@functools.lru_cache(maxsize=1)
def decodable_extensions() -> frozenset[str]:
    """Extensions (lower case, with the dot) of the files `decode_image` reads.

    A function, not a constant: Pillow registers its plugins' extensions in `Image.init()`
    (37 ms), which should not run at import.
    """
    Image.init()
    registered = Image.registered_extensions()
    return frozenset(ext.lower() for ext, fmt in registered.items() if fmt in _LISTED_FORMATS)


def decode_image(
    data: bytes,
    target_size: int,
    *,
    resize_method: ResizeMethod = "crop",
    pad_mode: PadMode = "reflection",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
    draft: bool = True,
) -> DecodedImage:
    """Decode `data` and prepare it for a model with square input `target_size`.

    `draft=False`: never a reduced-scale JPEG decode, so the pixels are exactly those of
    fastai's validation pipeline (slower on photos much larger than the model input).

    Raises ImageDecodeError (with `.kind` and `.reason`) for anything that is not a usable
    image; any other exception is a bug, not a bad file.
    """
    if target_size < 1:
        raise ValueError(f"target_size must be >= 1, got {target_size}")
    if not data:
        raise ImageDecodeError("empty", "file has 0 bytes")
    img = _open(data, max_pixels)
    try:
        fmt, mode = img.format or "unknown", img.mode
        stored_w, stored_h = img.size
        if draft:
            _draft_for(img, target_size, resize_method)
        try:
            img.load()
        except _CORRUPT_ERRORS as exc:
            raise ImageDecodeError("truncated", f"{fmt} data could not be decoded ({exc})") from exc
        orientation = _orientation(img)  # after load: PNG keeps its eXIf chunk after the pixels
        upright = _apply_orientation(img, orientation)
        rgb = to_rgb(upright, background=background)
        resized = fastai_resize(rgb, target_size, method=resize_method, pad_mode=pad_mode)
        array = np.asarray(resized, dtype=np.uint8)
    finally:
        img.close()
    width, height = (
        (stored_h, stored_w)
        if orientation in _SWAPPED_ORIENTATIONS
        else (
            stored_w,
            stored_h,
        )
    )
    return DecodedImage(array=array, width=width, height=height, format=fmt, mode=mode)


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before decoding a pixel."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "unrecognised", f"not a supported image format ({len(data)} bytes, starts {data[:8]!r})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", f"{exc}") from exc
    except _CORRUPT_ERRORS as exc:
        raise ImageDecodeError("corrupt", f"image header is malformed ({exc})") from exc
    w, h = img.size
    if w < 1 or h < 1:
        img.close()
        raise ImageDecodeError("corrupt", f"declared size {w}x{h} is empty")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageDecodeError(
            "too_large",
            f"declared size {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            "(decompression-bomb guard; raise max_pixels to accept it)",
        )
    try:
        img.seek(0)  # multi-frame formats: the first frame, whatever was opened last
    except _CORRUPT_ERRORS as exc:
        img.close()
        raise ImageDecodeError("corrupt", f"first frame unreadable ({exc})") from exc
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _CORRUPT_ERRORS as exc:
        raise ImageDecodeError("corrupt", f"EXIF block is malformed ({exc})") from exc
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except _CORRUPT_ERRORS as exc:
        raise ImageDecodeError("corrupt", f"EXIF orientation could not be applied ({exc})") from exc


def _draft_for(img: Image.Image, target: int, method: ResizeMethod) -> None:
    """Ask the JPEG decoder for the smallest DCT scale that keeps enough resolution."""
    if img.format not in ("JPEG", "MPO"):
        return
    w, h = img.size
    if method == "squish":
        req = (DRAFT_OVERSAMPLE * target, DRAFT_OVERSAMPLE * target)
    else:
        # Source pixels per output pixel, as fastai's Resize computes it (square target).
        m = min(w, h) / target if method == "crop" else max(w, h) / target
        req = (math.ceil(DRAFT_OVERSAMPLE * w / m), math.ceil(DRAFT_OVERSAMPLE * h / m))
    if w >= 2 * req[0] and h >= 2 * req[1]:
        img.draft(img.mode, req)


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, keeping what a person would see."""
    mode = img.mode
    has_transparency = "transparency" in img.info and mode in ("P", "L", "RGB")
    if mode in _ALPHA_MODES or has_transparency:
        return _composite(img.convert("RGBA"), background)
    if mode == "RGB":
        return img
    if mode == "P":
        return img.convert("RGB")
    if mode in _PLAIN_MODES:
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(img), mode="L").convert("RGB")
    raise ImageDecodeError("unsupported_mode", f"Pillow mode {mode!r} has no RGB conversion")


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """High-bit-depth grey -> 0..255 by scaling, not clipping.

    I;16*: the full 16-bit range maps to 8 bits (v * 255 / 65535, rounded).
    I (int32): values inside 0..65535 are taken as 16-bit (the usual origin: 16-bit PNG/TIFF);
    anything else is stretched min..max. F (float): 0..1 is scaled by 255; other ranges are
    stretched min..max; NaN becomes 0.
    """
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        return np.rint(a * (255.0 / 65535.0)).astype(np.uint8)
    if img.mode == "F" and lo >= 0 and hi <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    if hi == lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def fastai_resize(
    img: Image.Image,
    size: int,
    *,
    method: ResizeMethod = "crop",
    pad_mode: PadMode = "reflection",
) -> Image.Image:
    """fastai `Resize(size, method, pad_mode)` on the validation split, bit for bit.

    Mirrors `Resize.encodes` + `Image.crop_pad` (fastai 2.8): the same integer crop box,
    padding and bilinear resize, so inputs match the ones thresholds were chosen on.
    """
    w, h = img.size
    if method == "squish":
        return img.resize((size, size), Image.Resampling.BILINEAR)
    if method not in ("crop", "pad"):
        raise ValueError(f"unknown resize method {method!r}; expected crop, squish or pad")
    ratio_w, ratio_h = w / size, h / size
    take_w = ratio_w < ratio_h if method == "crop" else ratio_w > ratio_h
    m = ratio_w if take_w else ratio_h
    cw, ch = int(m * size), int(m * size)
    left, top = int(0.5 * (w - cw)), int(0.5 * (h - ch))
    cropped = img.crop((max(left, 0), max(top, 0), min(left + cw, w), min(top + ch, h)))
    pad = (max(-left, 0), max(-top, 0), max(cw - w + left, 0), max(ch - h + top, 0))
    if any(pad):
        cropped = _pad(cropped, pad, pad_mode)
    return cropped.resize((size, size), Image.Resampling.BILINEAR)


def _pad(img: Image.Image, pad: tuple[int, int, int, int], pad_mode: PadMode) -> Image.Image:
    """torchvision's `pad` for PIL images (what fastai calls), via numpy."""
    left, top, right, bottom = pad
    a = np.asarray(img)
    widths = ((top, bottom), (left, right), (0, 0))
    if pad_mode == "zeros":
        out = np.pad(a, widths, mode="constant")
    elif pad_mode == "border":
        out = np.pad(a, widths, mode="edge")
    elif pad_mode == "reflection":
        out = np.pad(a, widths, mode="reflect")
    else:
        raise ValueError(f"unknown pad mode {pad_mode!r}; expected reflection, zeros or border")
    return Image.fromarray(out, mode="RGB")
