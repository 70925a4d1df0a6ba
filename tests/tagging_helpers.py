"""Shared set-up for the tagging tests: a tiny real model, image folders, output readers.

Not a test module: the unit and integration tagging tests (and the kill-test subprocess)
import it. The model is a real fastai learner trained for one epoch on a tiny synthetic
shapes set, exported and registered exactly as the retrain flow does, so tagging runs
through registry.load_model (sha256 checks, unpickling, inference.json) like production.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_IMG_SIZE = 32


@dataclass(frozen=True)
class TinyModel:
    """A registered model and the files it came from (to register copies under new ids)."""

    home: Path
    version: str
    learner_file: Path
    thresholds: dict[str, Any]
    metrics: dict[str, Any]
    inference: dict[str, Any]

    def register_copy(self, version: str) -> str:
        from multitag import registry

        return registry.register_model(
            str(self.home),
            learner_file=self.learner_file,
            thresholds=self.thresholds,
            metrics=self.metrics,
            inference=self.inference,
            report_files={},
            version=version,
        )


def register_tiny_model(
    home: Path, work: Path, *, promote: bool = True, with_fastpath: bool = False
) -> TinyModel:
    """Train, export and register a small shapes model under `home` (about 5 CPU seconds).

    `with_fastpath`: also export and check the CPU fast path on the validation images and
    register it with the version, as the retrain flow does (a few more seconds).
    """
    from multitag import registry
    from multitag.config import ThresholdParams, shapes_train_params
    from multitag.data.shapes import make_shapes_dataset
    from multitag.training import learner
    from multitag.training import thresholds as th
    from multitag.training.retraining import label_prevalence

    dataset = make_shapes_dataset(work / "shapes", n_train=96, n_test=4, img_size=TINY_IMG_SIZE)
    params = shapes_train_params(img_size=TINY_IMG_SIZE, epochs=1, batch_size=32)
    result = learner.train(dataset, params)
    probs, targets = learner.predict_validation(result.learner)
    ts = th.select_thresholds(probs, targets, result.vocab, ThresholdParams(policy="global"))
    model_file = learner.export_learner(result.learner, work / "model.pkl", ts.as_array())
    table = learner.read_training_table(dataset)
    prevalence = label_prevalence(table, result.vocab)
    metrics = {
        "validation": th.evaluate(probs, targets, ts, result.vocab).to_dict(),
        "train_label_prevalence": prevalence["labels"],
        "train_none_rate": prevalence["none"],
    }
    extra: dict[str, Path] = {}
    if with_fastpath:
        from multitag.training.retraining import export_fastpath

        spec = learner.inference_spec(result.learner)
        extra, metrics["fastpath"] = export_fastpath(
            result.learner, work, dataset, ts, spec, n_check=1000
        )
    version = registry.register_model(
        str(home),
        learner_file=model_file,
        thresholds=ts.to_json(),
        metrics=metrics,
        inference=learner.inference_spec(result.learner),
        report_files={},
        extra_files=extra,
    )
    if promote:
        registry.promote(str(home), version)
    return TinyModel(
        home, version, model_file, ts.to_json(), metrics, learner.inference_spec(result.learner)
    )


def shape_images(n: int, seed: int = 0, size: int = 40) -> list[bytes]:
    """n small JPEGs of random coloured rectangles (cheap, varied, decodable)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        a[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.integers(0, 256, 3)
        out.append(encode(Image.fromarray(a), "JPEG"))
    return out


def write_images(folder: Path, n: int, *, start: int = 0, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(shape_images(n, seed=seed), start=start):
        path = folder / f"img_{i:05d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring a size, and no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def hostile_files() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected error kind or None when it must be tagged)."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), np.uint8))
    good_jpeg = encode(rgb, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(rgb, "JPEG", exif=exif.tobytes())
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (0, 0, 15, 30))
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40)
    one_bit = Image.new("1", (24, 24), 0)
    one_bit.paste(1, (0, 0, 12, 24))
    return {
        "good.jpg": (good_jpeg, None),
        "UPPER_CASE.JPEG": (good_jpeg, None),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "zero_bytes.jpg": (b"", "empty"),
        "text_named.jpg": (b"hello, I am not an image\n", "unrecognised"),
        "cmyk.jpg": (encode(Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG"), None),
        "sixteen_bit.png": (
            encode(Image.fromarray(np.full((30, 30), 40000, np.uint16)), "PNG"),
            None,
        ),
        "exif_rotated.jpg": (rotated, None),
        "huge_declared.png": (png_header_only(100_000, 100_000), "too_large"),
        "animated.gif": (gif.getvalue(), None),
        "palette_transparent.png": (encode(palette, "PNG", transparency=0), None),
        "la.png": (encode(Image.new("LA", (20, 20), (90, 128)), "PNG"), None),
        "one_bit.png": (encode(one_bit, "PNG"), None),
    }


def read_tags(partition: str | Path):  # -> pyarrow.Table
    """All Parquet shards of a partition as one table (pyarrow's dataset reader)."""
    import pyarrow.dataset as ds

    return ds.dataset(str(partition), format="parquet").to_table()
