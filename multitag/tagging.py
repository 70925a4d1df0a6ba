"""Bulk tagging: list images, score them in batches, write Parquet shards exactly once.

The flow (or `tag_source`, the in-process path) calls, in order::

    plan = plan_run(params)                          # list source, claim new images, shard
    tagger = tagger_for(params, plan.model_version)  # once per process; cached
    results = [tag_shard(spec, tagger) for spec in plan.shards]   # one task per shard
    summary = summarize_run(plan, results)
    write_manifest(summary)

Layout under `out/<dataset>/` (out defaults to MULTITAG_HOME/tags)::

    model=<version>/part-<epoch>-<index>.parquet   the tags (data_contracts/tags_output.yaml)
    _plans/model=<version>/epoch-<epoch>.arrow     the claim log: which images each shard holds
    _manifests/<run-id>.json                       one per run: counts, shards, timings, drift

Exactly once, and why it holds
------------------------------
Every image is claimed by exactly one shard through an append-only claim log. A run lists
the source, reads every epoch file of the log and claims the images no epoch holds yet by
creating the next epoch file with an exclusive create (local: link(2), which fails if the
name exists; S3: PutObject with `If-None-Match: *`). The epoch number is the linearisation
point: if two runs race for epoch N, one create fails; the loser reads the winner's epoch,
drops those images from its own claim and tries epoch N+1. So no two epochs ever claim the
same image, whatever each run listed (a bucket growing between two starts included).

A shard's Parquet file is also created exclusively and written whole (local: temp file,
fsync, link; S3: one PUT), so it exists completely or not at all. A shard that is claimed
but has no Parquet file (its run was killed, or is still running) is tagged by any later
run; if two runs tag it at once, the second create fails and its rows are dropped. Hence,
for one (dataset, model version) partition:

- an image appears in at most one Parquet file, under any interleaving of runs and kills;
- after a run completes without an exception, every image it listed appears exactly once;
- a rerun tags only images with no finished shard, and reports the others as skipped.

Rows of images that fail to read or decode are written as error rows; they count as done
(rerunning will not retry them). Read errors that may be transient (network, throttling)
raise instead, so the shard fails and is retried by the flow (or the next run).

Concurrent runs waste no correctness but may duplicate work on unfinished shards; runs
take their own shards first in order and others' unfinished shards in reverse order, so
two runs started together meet in the middle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import itertools
import logging
import math
import os
import posixpath
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from multitag.config import TagParams, default_home, get_settings
from multitag.imaging import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    DecodedImage,
    ImageDecodeError,
    decode_image,
)
from multitag.storage import (
    exists,
    fs_and_path,
    join,
    read_bytes,
    read_json,
    remove_stale_temp_files,
    unstrip,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from multitag.thresholds import ThresholdSet

# Pillow's raster formats, plus HEIC/HEIF: Pillow cannot decode those, but listing them makes
# phone photos show up as "unrecognised" error rows instead of vanishing from the counts.
# fmt: off
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".heic", ".heif",
})
# fmt: on
CONTRACT_VERSION = "1.0.0"  # data_contracts/tags_output.yaml
PLAN_FORMAT = "multitag-plan/1"
PLANS_DIR = "_plans"
MANIFESTS_DIR = "_manifests"
NONE_LABEL = "(none)"  # the "no label above threshold" row in rate tables
_EPOCH_RE = re.compile(r"^epoch-(\d{6,})\.arrow$")
_PART_RE = re.compile(r"^part-(\d{6,}-\d{6,})\.parquet$")
_MAX_EPOCH_TRIES = 1000
_S3_FETCH_CONCURRENCY = 32
# Read failures that are facts about the object, not the network: they become error rows.
_PERMANENT_READ_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class TaggingError(Exception):
    """Tagging cannot start or continue; the message says what to change."""


# ================================================================================ sources


class SourceUnavailableError(TaggingError):
    """The image source could not be listed (unreachable endpoint, denied, bad credentials)."""


def is_image_name(name: str) -> bool:
    """Image files are recognised by extension, case-insensitively (IMG_001.JPG counts)."""
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(source: str) -> Iterator[str]:
    """Every image under `source` (recursively), as full URIs in sorted order.

    Local folders yield absolute paths, s3:// prefixes `s3://bucket/key`. S3 is listed page
    by page keeping only the keys (never the per-object metadata), so a 100k-object prefix
    costs the list of its image keys and no more. A missing folder, or a prefix with no
    objects at all, raises FileNotFoundError (a typo must not look like "nothing to tag").
    """
    fs, path = fs_and_path(source)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols:
        keys = _list_local(path)
    elif hasattr(fs, "call_s3"):
        try:
            keys = _list_s3(fs, path, source)
        except (FileNotFoundError, TaggingError):
            raise
        except Exception as e:
            raise SourceUnavailableError(
                f"cannot list {source}: {type(e).__name__}: {e}. Check the bucket name, the "
                "endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) of this worker"
            ) from e
    else:
        if not fs.exists(path):
            raise FileNotFoundError(f"image source {source} does not exist")
        keys = [unstrip(fs, p) for p in fs.find(path) if is_image_name(p)]
    keys.sort()
    return iter(keys)


def _list_local(root: str) -> list[str]:
    if os.path.isfile(root):
        return [os.path.abspath(root)] if is_image_name(root) else []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image source {root} is not a folder (or does not exist)")
    found: list[str] = []
    for folder, _dirs, files in os.walk(root):
        found.extend(os.path.join(folder, f) for f in files if is_image_name(f))
    return [os.path.abspath(p) for p in found]


def _list_s3(fs: Any, path: str, source: str) -> list[str]:
    bucket, key, _ = fs.split_path(path)
    if not bucket:
        raise TaggingError(f"image source {source} names no bucket; use s3://bucket/prefix")
    prefix = key.rstrip("/") + "/" if key else ""
    keys: list[str] = []
    n_objects = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            n_objects += 1
            name = obj["Key"]
            if not name.endswith("/") and is_image_name(name):
                keys.append(f"s3://{bucket}/{name}")
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    if n_objects == 0:
        raise FileNotFoundError(f"no objects under {source} (s3://{bucket}/{prefix}); check it")
    return keys


def default_dataset_name(source: str) -> str:
    """The last folder of the source (`s3://b/photos/2024` -> `2024`), made path-safe."""
    _, path = fs_and_path(source)
    base = posixpath.basename(path.rstrip("/")) or path.strip("/").split("/")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    if not name:
        raise TaggingError(f"cannot derive a dataset name from {source!r}; pass dataset_name")
    return name


# ======================================================================== reading bytes


def read_many(uris: Sequence[str]) -> list[bytes | OSError]:
    """The bytes of each URI, or the permanent error that explains why there are none.

    Objects stores are fetched concurrently (one request per object, up to 32 in flight);
    transient errors propagate so the whole shard can be retried.
    """
    out: list[bytes | OSError] = [b""] * len(uris)
    by_fs: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        by_fs.setdefault(_protocol_of(uri), []).append(i)
    for idxs in by_fs.values():
        fs, _ = fs_and_path(uris[idxs[0]])
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "file" in protocols:
            for i in idxs:
                out[i] = _read_local(fs_and_path(uris[i])[1])
        elif getattr(fs, "async_impl", False):
            paths = [fs._strip_protocol(uris[i]) for i in idxs]
            from fsspec.asyn import sync

            blobs = sync(fs.loop, _fetch_async, fs, paths, _S3_FETCH_CONCURRENCY)
            for i, blob in zip(idxs, blobs, strict=True):
                out[i] = blob
        else:
            for i in idxs:
                out[i] = _read_sync(fs, fs._strip_protocol(uris[i]))
    return out


def _protocol_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head if sep else "file"


def _read_local(path: str) -> bytes | OSError:
    try:
        with open(path, "rb") as f:
            return f.read()
    except _PERMANENT_READ_ERRORS as exc:
        return exc


def _read_sync(fs: Any, path: str) -> bytes | OSError:
    try:
        return fs.cat_file(path)
    except _PERMANENT_READ_ERRORS as exc:
        return exc


async def _fetch_async(fs: Any, paths: list[str], limit: int) -> list[bytes | OSError]:
    sem = asyncio.Semaphore(limit)

    async def one(path: str) -> bytes | OSError:
        async with sem:
            try:
                return await fs._cat_file(path)
            except _PERMANENT_READ_ERRORS as exc:
                return exc

    return list(await asyncio.gather(*(one(p) for p in paths)))


def _read_error_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing: file not found (deleted after listing?)"
    if isinstance(exc, PermissionError):
        return f"unreadable: permission denied ({exc})"
    return f"unreadable: not a file ({exc})"


# ================================================================ model input + scoring


@dataclass(frozen=True)
class InferenceSpec:
    """How the model wants its input: inference.json, as multitag.training writes it."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocab: tuple[str, ...]
    resize_method: str = "crop"
    pad_mode: str = "reflection"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceSpec:
        missing = [
            k for k in ("img_size", "mean", "std", "vocab", "resize_method") if k not in data
        ]
        if missing:
            raise TaggingError(
                f"inference spec lacks {missing}: the model's inference.json must say how its "
                "inputs were prepared (multitag.training.inference_spec writes it)"
            )
        size = data["img_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise TaggingError(f"inference img_size must be a positive int (square); got {size!r}")
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise TaggingError(f"inference mean/std must be 3 values (std > 0); got {mean}, {std}")
        method = str(data["resize_method"])
        if method not in ("crop", "squish", "pad"):
            raise TaggingError(f"unknown resize_method {method!r}; expected crop, squish or pad")
        vocab = tuple(str(v) for v in data["vocab"])
        if not vocab:
            raise TaggingError("inference vocab is empty: the model has no labels")
        return cls(size, mean, std, vocab, method, str(data.get("pad_mode", "reflection")))  # type: ignore[arg-type]

    @classmethod
    def from_learner(cls, learn: Any) -> InferenceSpec:
        """Read the validation transforms of any fastai learner (Resize + Normalize)."""
        from fastai.data.transforms import Normalize
        from fastai.vision.augment import Resize

        resizes = [t for t in learn.dls.after_item.fs if isinstance(t, Resize)]
        norms = [t for t in learn.dls.after_batch.fs if isinstance(t, Normalize)]
        if len(resizes) != 1 or len(norms) != 1:
            raise TaggingError(
                f"learner has {len(resizes)} Resize item and {len(norms)} Normalize batch "
                "transforms; exactly one of each is needed to reproduce its input"
            )
        w, h = resizes[0].size
        if w != h:
            raise TaggingError(f"non-square model input {w}x{h} is not supported")
        norm = norms[0]
        return cls.from_dict(
            {
                "img_size": int(w),
                "mean": [float(v) for v in norm.mean.flatten().cpu()],
                "std": [float(v) for v in norm.std.flatten().cpu()],
                "vocab": [str(v) for v in learn.dls.vocab],
                "resize_method": str(resizes[0].method),
                "pad_mode": str(resizes[0].pad_mode),
            }
        )


class Scorer(Protocol):
    """Anything that turns a batch of model-ready images into per-label probabilities.

    `images`: uint8 (N, H, W, 3) RGB, already resized to the model input. Returns float32
    (N, L) sigmoid probabilities in vocab order. Torch today; ONNX Runtime / int8 later.
    """

    def score_batch(self, images: np.ndarray) -> np.ndarray: ...


class TorchScorer:
    """Batched torch inference: eval mode, inference_mode, the model's own normalisation."""

    def __init__(
        self,
        model: Any,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        n_labels: int,
        device: str = "cpu",
        precision: str = "fp32",
        captured: bool = False,
    ) -> None:
        """`captured`: a `torch.export` program's module, fixed in eval mode when it was
        exported (it refuses `.eval()`)."""
        import torch

        if precision not in ("fp32", "bf16"):
            raise TaggingError(
                f"precision {precision!r} is not available for the torch scorer; use fp32 or "
                "bf16 (int8 needs a quantised ONNX model)"
            )
        self.device = torch.device(device)
        self.model = (model if captured else model.eval()).to(self.device)
        self.precision = precision
        self.n_labels = n_labels
        self._mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device)
        self._std = torch.tensor(list(std), dtype=torch.float32, device=self.device)
        self._mean, self._std = self._mean.view(1, 3, 1, 1), self._std.view(1, 3, 1, 1)

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        import torch

        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            # fastai order: IntToFloatTensor (/255) then Normalize((x - mean) / std).
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self._mean) / self._std
            if self.precision == "bf16":
                # [fastpath] channels_last input: oneDNN's bf16 convolutions run NHWC.
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            probs = torch.sigmoid(logits.float()).cpu().numpy()
        if probs.shape != (images.shape[0], self.n_labels):
            raise TaggingError(
                f"model returned scores of shape {probs.shape}, expected "
                f"({images.shape[0]}, {self.n_labels}): model and vocab do not match"
            )
        return probs.astype(np.float32, copy=False)


def _torch_precision(precision: str) -> str:
    # "auto" and "int8" start from the fp32 torch model; `load_tagger` then swaps in the fast
    # path that multitag.fastpath measured to keep the thresholds' decisions.
    return "fp32" if precision in ("auto", "int8") else precision


# ================================================================================ tagger


@dataclass(frozen=True)
class ModelBaseline:
    """What the model saw in training, to compare a run's label rates against."""

    vocab: tuple[str, ...]
    train_label_prevalence: dict[str, float] | None = None
    train_none_rate: float | None = None

    @classmethod
    def from_metrics(cls, vocab: Sequence[str], metrics: Mapping[str, Any] | None) -> ModelBaseline:
        metrics = metrics or {}
        prev = metrics.get("train_label_prevalence")
        none = metrics.get("train_none_rate")
        return cls(
            vocab=tuple(vocab),
            train_label_prevalence={str(k): float(v) for k, v in prev.items()} if prev else None,
            train_none_rate=float(none) if none is not None else None,
        )


@dataclass(frozen=True)
class TagRow:
    """One output row (see data_contracts/tags_output.yaml)."""

    image_uri: str
    labels: list[str] | None
    scores: dict[str, float] | None
    top_label: str | None
    top_score: float | None
    width: int | None
    height: int | None
    tagged_at: datetime
    error: str | None = None


@dataclass(frozen=True)
class BatchResult:
    rows: list[TagRow]
    prepare_s: float  # read + decode, in the background thread
    model_s: float  # scoring + thresholds, in the caller's thread


@dataclass(frozen=True)
class _Prepared:
    uris: list[str]
    items: list[DecodedImage | str]  # a decoded image, or the error reason
    seconds: float


class Tagger:
    """A model ready to tag: scorer, input spec, thresholds, and the decode pipeline.

    Build it once per process (`tagger_for`, `Tagger.from_loaded`, `Tagger.from_learner`)
    and reuse it for every shard. `tag()` overlaps reading/decoding of the next batches
    (`decode_workers` threads) with scoring of the current one.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        spec: InferenceSpec,
        thresholds: ThresholdSet,
        model_version: str,
        baseline: ModelBaseline | None = None,
        batch_size: int = 64,
        decode_workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        background: tuple[int, int, int] = WHITE,
    ) -> None:
        if list(thresholds.vocab) != list(spec.vocab):
            raise TaggingError(
                f"thresholds vocab {list(thresholds.vocab)} differs from the model vocab "
                f"{list(spec.vocab)}; they must come from the same model version"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.scorer = scorer
        self.spec = spec
        self.thresholds = thresholds
        self.model_version = model_version
        self.baseline = baseline or ModelBaseline(vocab=spec.vocab)
        self.batch_size = batch_size
        self.decode_workers = decode_workers or default_decode_workers()
        self.max_pixels = max_pixels
        self.background = background
        # [fastpath] which scorer runs and why (load_tagger may swap in a fast path).
        self.precision_choice = str(getattr(scorer, "precision", type(scorer).__name__))
        _allow_pixels(max_pixels)

    @classmethod
    def from_loaded(
        cls, loaded: Any, *, device: str = "auto", precision: str = "auto", **kwargs: Any
    ) -> Tagger:
        """From a registry `LoadedModel` (multitag.registry.load_model)."""
        spec = InferenceSpec.from_dict(loaded.inference)
        baseline = ModelBaseline.from_metrics(spec.vocab, loaded.metrics)
        return cls.from_learner(
            loaded.learner,
            loaded.thresholds,
            model_version=loaded.version,
            spec=spec,
            baseline=baseline,
            device=device,
            precision=precision,
            **kwargs,
        )

    @classmethod
    def from_learner(
        cls,
        learn: Any,
        thresholds: ThresholdSet,
        *,
        model_version: str,
        spec: InferenceSpec | None = None,
        baseline: ModelBaseline | None = None,
        device: str = "auto",
        precision: str = "auto",
        **kwargs: Any,
    ) -> Tagger:
        """From a fastai learner; `spec=None` reads its Resize/Normalize transforms."""
        from multitag.runtime import pick_device

        spec = spec or InferenceSpec.from_learner(learn)
        dev = pick_device(device)
        scorer = TorchScorer(
            learn.model,
            mean=spec.mean,
            std=spec.std,
            n_labels=len(spec.vocab),
            device=dev,
            precision=_torch_precision(precision),
        )
        return cls(
            scorer,
            spec=spec,
            thresholds=thresholds,
            model_version=model_version,
            baseline=baseline,
            **kwargs,
        )

    @property
    def vocab(self) -> tuple[str, ...]:
        return self.spec.vocab

    def decode(self, data: bytes) -> DecodedImage:
        return decode_image(
            data,
            self.spec.img_size,
            resize_method=self.spec.resize_method,  # type: ignore[arg-type]
            pad_mode=self.spec.pad_mode,  # type: ignore[arg-type]
            max_pixels=self.max_pixels,
            background=self.background,
        )

    def tag(
        self, uris: Sequence[str], *, on_batch: Callable[[int], None] | None = None
    ) -> Iterator[BatchResult]:
        """Rows for `uris`, in order, one BatchResult per batch."""
        for prepared in self._prepared_batches(uris):
            t0 = time.perf_counter()
            rows = self._score(prepared)
            yield BatchResult(rows, prepared.seconds, time.perf_counter() - t0)
            if on_batch is not None:
                on_batch(len(rows))

    def _prepared_batches(self, uris: Sequence[str]) -> Iterator[_Prepared]:
        """Prepare up to `decode_workers` batches ahead of the one being scored.

        Memory is bounded by (decode_workers + 1) batches, whatever len(uris) is.
        """
        batches = (
            list(uris[i : i + self.batch_size]) for i in range(0, len(uris), self.batch_size)
        )
        pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="multitag-decode")
        pending: deque[Future[_Prepared]] = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(self._prepare, batch))
                if len(pending) > self.decode_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _prepare(self, uris: list[str]) -> _Prepared:
        t0 = time.perf_counter()
        items: list[DecodedImage | str] = []
        for blob in read_many(uris):
            if isinstance(blob, OSError):
                items.append(_read_error_reason(blob))
                continue
            try:
                items.append(self.decode(blob))
            except ImageDecodeError as exc:
                items.append(exc.reason)
        return _Prepared(uris, items, time.perf_counter() - t0)

    def _score(self, prepared: _Prepared) -> list[TagRow]:
        from multitag.thresholds import apply_thresholds

        ok = [i for i, item in enumerate(prepared.items) if isinstance(item, DecodedImage)]
        now = datetime.now(UTC)
        rows: list[TagRow | None] = [None] * len(prepared.uris)
        if ok:
            batch = np.stack([prepared.items[i].array for i in ok])  # type: ignore[union-attr]
            probs = self.scorer.score_batch(batch)
            decisions = apply_thresholds(probs, self.thresholds)
            for k, i in enumerate(ok):
                image: DecodedImage = prepared.items[i]  # type: ignore[assignment]
                rows[i] = self._row(prepared.uris[i], probs[k], decisions[k], image, now)
        for i, item in enumerate(prepared.items):
            if isinstance(item, str):
                rows[i] = TagRow(prepared.uris[i], None, None, None, None, None, None, now, item)
        return [r for r in rows if r is not None]

    def _row(
        self, uri: str, p: np.ndarray, above: np.ndarray, image: DecodedImage, now: datetime
    ) -> TagRow:
        order = np.argsort(-p, kind="stable")  # by score, ties in vocab order
        vocab = self.spec.vocab
        labels = [vocab[j] for j in order if above[j]]
        scores = {label: float(s) for label, s in zip(vocab, p, strict=True)}
        top = int(order[0])
        return TagRow(
            uri, labels, scores, vocab[top], float(p[top]), image.width, image.height, now
        )


def default_decode_workers() -> int:
    """CPUs - 1, at least 2, at most 8: GPUs need more to stay fed.

    At least 2, measured on 2 shared cores with the ONNX int8 scorer (256 images): phone
    photos (2000x1500) tag 15-45% faster with two decode threads than with one (resnet18
    55 -> 80 img/s; decoding there costs as much CPU as the model), VOC-sized photos within
    +-5%. Threads, not DataLoader processes: those lost 0-10% (they fight the model for cores).
    """
    from multitag.runtime import available_cpus

    return max(2, min(8, available_cpus() - 1))


def _allow_pixels(max_pixels: int | None) -> None:
    """Let our own, stricter-per-call check govern sizes up to `max_pixels`.

    Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS while opening (process-wide); a
    limit configured above that must widen it, or those images would fail with Pillow's
    generic error. Only ever raised, never lowered.
    """
    from PIL import Image

    current = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and current is not None and max_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_pixels


def load_tagger(params: TagParams, model_version: str | None = None) -> Tagger:
    """Load a registry model (sha256-verified) and wrap it as a Tagger.

    When the fast path `precision` picks has a file of its own (recorded with the version at
    export: ONNX fp32/int8 or the bf16 torch program; for older versions, an ONNX file cached
    after a check on this machine), the learner is not unpickled and fastai is not imported
    (seconds per process on a small CPU). Otherwise the full load.
    """
    from multitag.registry import load_metadata, unpickle_model

    meta = load_metadata(params.home, model_version or params.model_version)
    record, why = _export_record(meta, params)
    fast = (
        _registry_tagger(meta, params, record) if record else _tagger_from_cached_onnx(meta, params)
    )
    if fast is not None:
        return fast
    loaded = unpickle_model(meta)
    tagger = Tagger.from_loaded(
        loaded,
        device=params.device,
        precision=params.precision,
        batch_size=params.batch_size,
        decode_workers=params.decode_workers,
        max_pixels=params.max_pixels,
    )
    if record is not None:
        _use_recorded_torch_path(tagger, record, params)
    else:
        if why:
            logging.getLogger(__name__).warning("%s: checking a fast path on this machine", why)
        _use_fast_path(tagger, loaded, params)
    return tagger


# [fastpath] wiring of precision auto/int8 to multitag.fastpath (performance helper).
def _wants_fast_path(params: TagParams) -> bool:
    from multitag.runtime import pick_device

    return params.precision in ("auto", "int8") and pick_device(params.device) == "cpu"


def _export_record(meta: Any, params: TagParams) -> tuple[Any, str]:
    """The version's export-time fast-path record when this run can use it, and if not, why.

    The record's files were hashed with the version; a record that cannot be read or that
    belongs to another model file is not used (the run checks a fast path itself instead).
    """
    if meta.fastpath is None or not _wants_fast_path(params):
        return None, ""
    from multitag import fastpath

    try:
        record = fastpath.FastPathRecord.from_json(meta.fastpath)
    except (fastpath.FastPathError, KeyError, TypeError, ValueError) as exc:
        return None, f"model {meta.version}: its fastpath.json is not usable ({exc})"
    if record.model_sha256 != meta.sha256 or record.n_labels != len(meta.thresholds.vocab):
        return None, f"model {meta.version}: its fastpath.json describes another model file"
    return record, ""


def _choose_recorded(record: Any, params: TagParams) -> tuple[str, str]:
    from multitag import fastpath

    try:
        name, reason = fastpath.choose_for_run(
            record, params.precision, fastpath.DEFAULT_AGREEMENT_BAR
        )
    except fastpath.FastPathError as exc:
        raise TaggingError(str(exc)) from exc
    where = record.extra.get("check_set", "sampled images")
    return name, f"{reason}; checked at export on {record.n_check} {where} images"


def _named(name: str, reason: str) -> str:
    """`name: reason`, without naming the scorer twice (`fastpath.choose` reasons often start
    with it)."""
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


def _registry_tagger(meta: Any, params: TagParams, record: Any) -> Tagger | None:
    """A Tagger over the version's own fast-path file (ONNX, or the bf16 torch program) when
    the recorded choice has one; None when it needs the learner (torch fp32, or a bf16 pick
    whose architecture could not be exported as a program)."""
    from multitag import fastpath
    from multitag.registry import verified_file

    name, reason = _choose_recorded(record, params)
    cand = record.candidates[name]
    if cand.file is None:
        return None
    path = verified_file(meta, str(cand.file))  # hashed against SHA256SUMS now
    if cand.sha256 != meta.sums.get(str(cand.file)):
        raise TaggingError(
            f"model {meta.version}: fastpath.json names {cand.file} with sha256 {cand.sha256}, "
            f"but SHA256SUMS says {meta.sums.get(str(cand.file))}; re-register the model"
        )
    spec = InferenceSpec.from_dict(meta.inference)
    n_labels = len(spec.vocab)
    if name == fastpath.TORCH_BF16:
        scorer = fastpath.program_bf16_scorer(path, spec.mean, spec.std, n_labels)
    else:
        scorer = fastpath.OrtScorer(path, mean=spec.mean, std=spec.std, n_labels=n_labels,
                                    name=name)  # fmt: skip
    return _tagger_over(scorer, meta, params, f"{_named(name, reason)} (learner not unpickled)")


def _tagger_over(scorer: Any, meta: Any, params: TagParams, choice: str) -> Tagger:
    spec = InferenceSpec.from_dict(meta.inference)
    tagger = Tagger(
        scorer,
        spec=spec,
        thresholds=meta.thresholds,
        model_version=meta.version,
        baseline=ModelBaseline.from_metrics(spec.vocab, meta.metrics),
        batch_size=params.batch_size,
        decode_workers=params.decode_workers,
        max_pixels=params.max_pixels,
    )
    tagger.precision_choice = choice
    logging.getLogger(__name__).info("precision %s -> %s", params.precision, choice)
    return tagger


def _use_recorded_torch_path(tagger: Tagger, record: Any, params: TagParams) -> None:
    """The export-time record picked a torch scorer (bf16, or fp32 when nothing faster agreed)."""
    from multitag import fastpath

    name, reason = _choose_recorded(record, params)
    scorer = tagger.scorer
    if name == fastpath.TORCH_BF16 and isinstance(scorer, TorchScorer):
        spec = tagger.spec
        tagger.scorer = fastpath.bf16_scorer(scorer.model, spec.mean, spec.std, len(spec.vocab))
    tagger.precision_choice = _named(name, reason)
    logging.getLogger(__name__).info("precision %s -> %s", params.precision,
                                     tagger.precision_choice)  # fmt: skip


def _use_fast_path(tagger: Tagger, loaded: Any, params: TagParams) -> None:
    """Swap the fp32 torch scorer for the fast path `precision` asks for (CPU only).

    For versions registered without an export-time record: the fast path is checked against
    this fp32 model on a sample of `params.source` the first time a model file is used on a
    machine (then cached by its sha256; see multitag.fastpath).
    """
    scorer = tagger.scorer
    if params.precision not in ("auto", "int8") or not isinstance(scorer, TorchScorer):
        return
    if scorer.device.type != "cpu":
        if params.precision == "int8":
            raise TaggingError("precision=int8 runs on CPU only; use auto, fp32 or bf16 on GPU")
        return
    from multitag import fastpath

    try:
        selection = fastpath.select_scorer(
            scorer.model,
            precision=params.precision,
            mean=tagger.spec.mean,
            std=tagger.spec.std,
            img_size=tagger.spec.img_size,
            thresholds=tagger.thresholds,
            model_sha256=loaded.sha256,
            sample=lambda n: sample_images(params.source, tagger.decode, n),
            batch_size=params.batch_size,
        )
    except fastpath.FastPathError as exc:
        raise TaggingError(str(exc)) from exc
    tagger.scorer = selection.scorer
    tagger.precision_choice = _named(selection.name, selection.reason)


def _tagger_from_cached_onnx(meta: Any, params: TagParams) -> Tagger | None:
    """A Tagger over the cached, verified ONNX scorer `precision` would pick; else None.

    For versions without an export-time record. None (so the learner is loaded) when:
    precision is fp32/bf16; the device is not the CPU; no record exists for this model's
    sha256 or a cached file fails its sha256 check (`fastpath.load_record`); or the scorer
    the record picks is a torch one (it needs the learner).
    """
    if not _wants_fast_path(params):
        return None
    from multitag import fastpath

    spec = InferenceSpec.from_dict(meta.inference)
    record = fastpath.load_record(meta.sha256)
    if record is None or record.n_labels != len(spec.vocab):
        return None
    if params.precision == "int8" and fastpath.ORT_INT8 not in record.candidates:
        return None
    try:
        name, reason = fastpath.choose_for_run(
            record, params.precision, fastpath.DEFAULT_AGREEMENT_BAR
        )
    except fastpath.FastPathError:
        return None
    if name not in (fastpath.ORT_FP32, fastpath.ORT_INT8):
        return None
    scorer = fastpath.make_scorer(
        name, record, None, mean=spec.mean, std=spec.std, n_labels=len(spec.vocab)
    )
    return _tagger_over(
        scorer, meta, params, f"{_named(name, reason)} (cached fast path; learner not unpickled)"
    )


def sample_images(
    source: str, decode: Callable[[bytes], DecodedImage], n: int
) -> np.ndarray | None:
    """Up to n decoded images spread evenly over the listing of `source`; None if < n listed.

    Spread, not the first n: the first files of a sorted listing are often one folder.
    """
    try:
        uris = list(list_images(source))
    except (FileNotFoundError, TaggingError):
        return None
    if len(uris) < n:
        return None
    picks = [uris[int(i)] for i in np.linspace(0, len(uris) - 1, n).round().astype(int)]
    arrays = []
    for blob in read_many(picks):
        if isinstance(blob, OSError):
            continue
        try:
            arrays.append(decode(blob).array)
        except ImageDecodeError:
            continue
    return np.stack(arrays) if arrays else None


def tagger_for(params: TagParams, model_version: str) -> Tagger:
    """`load_tagger`, cached per process: every shard task on a worker reuses one model."""
    key = params.model_copy(
        update={"model_version": model_version, "home": params.home or default_home()}
    )
    return _cached_tagger(key.model_dump_json(include=_TAGGER_FIELDS))


_TAGGER_FIELDS = {
    "source",  # [fastpath] precision auto samples it when a model's fast path is unchecked
    "home",
    "model_version",
    "device",
    "precision",
    "batch_size",
    "decode_workers",
    "max_pixels",
}


def prefetch_tagger(params: TagParams) -> str | None:
    """Load the tagger a run of `params` will use into this process's cache (`tagger_for`).

    Why: the CLI calls it while Prefect's temporary server boots on the other core, so
    hashing the model's files, importing onnxruntime and building the session overlap a wait
    instead of delaying the first shard. Returns the version loaded, or None when loading
    failed: the run then repeats the same calls inside its tasks, where a failure is reported
    with the task's state and message (so nothing is cached and nothing is hidden).
    """
    try:
        version = resolve_model_version(params)
        tagger_for(params, version)
    except Exception as exc:  # the flow makes the same calls and reports this failure
        logging.getLogger(__name__).debug("tagger prefetch failed (%s); the run retries it", exc)
        return None
    return version


@functools.lru_cache(maxsize=2)
def _cached_tagger(key_json: str) -> Tagger:
    import json

    fields = json.loads(key_json)
    params = TagParams(**fields)
    return load_tagger(params, fields["model_version"])


# ================================================================================ output


@functools.lru_cache(maxsize=1)
def tags_schema() -> pa.Schema:
    """The Parquet schema of data_contracts/tags_output.yaml."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("image_uri", pa.string(), nullable=False),
            pa.field("labels", pa.list_(pa.string())),
            pa.field("scores", pa.map_(pa.string(), pa.float32())),
            pa.field("top_label", pa.string()),
            pa.field("top_score", pa.float32()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("tagged_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("error", pa.string()),
        ],
        metadata={"multitag.contract": f"tags_output {CONTRACT_VERSION}"},
    )


def rows_to_table(rows: Sequence[TagRow], model_version: str) -> pa.Table:
    import pyarrow as pa

    schema = tags_schema()
    columns = {
        "image_uri": [r.image_uri for r in rows],
        "labels": [r.labels for r in rows],
        "scores": [list(r.scores.items()) if r.scores is not None else None for r in rows],
        "top_label": [r.top_label for r in rows],
        "top_score": [r.top_score for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "model_version": [model_version] * len(rows),
        "tagged_at": [r.tagged_at for r in rows],
        "error": [r.error for r in rows],
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_bytes(table: pa.Table, metadata: Mapping[str, str]) -> bytes:
    import pyarrow.parquet as pq

    meta = {
        **(table.schema.metadata or {}),
        **{k.encode(): v.encode() for k, v in metadata.items()},
    }
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    return buf.getvalue()


def validate_tags_table(table: pa.Table, *, model_version: str | None = None) -> list[str]:
    """Violations of data_contracts/tags_output.yaml's quality rules ("rule: what, where").

    Checks a whole partition read back (e.g. `pyarrow.dataset.dataset(partition)`); an empty
    list means the output honours the contract. Reports at most a few rows per rule.
    """
    import pyarrow.compute as pc

    problems: list[str] = []
    n = table.num_rows
    uris = table.column("image_uri")
    if pc.count_distinct(uris).as_py() != n:
        counts = table.group_by("image_uri").aggregate([("image_uri", "count")])
        dup = counts.filter(pc.greater(counts.column("image_uri_count"), 1))
        examples = dup.column("image_uri").to_pylist()[:5]
        problems.append(
            f"unique_image_per_model: {dup.num_rows} image(s) repeated, e.g. {examples}"
        )
    versions = pc.unique(table.column("model_version")).to_pylist()
    if len(versions) > 1 or (model_version is not None and versions not in ([model_version], [])):
        problems.append(f"one_model_per_partition: model_version values {versions[:5]}")
    for row in _iter_rows(table):
        problems.extend(_row_problems(row))
        if len(problems) >= 50:
            problems.append("... (stopped after 50 problems)")
            break
    return problems


def _iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=10_000):
        yield from batch.to_pylist()


def _row_problems(row: Mapping[str, Any]) -> list[str]:
    uri, error = row["image_uri"], row["error"]
    result_cols = ("labels", "scores", "top_label", "top_score")
    if error is not None:
        set_cols = [c for c in result_cols if row[c] is not None]
        return [f"error_xor_result: {uri} has an error and {set_cols}"] if set_cols else []
    missing = [c for c in (*result_cols, "width", "height") if row[c] is None]
    if missing:
        return [f"error_xor_result: {uri} has no error but lacks {missing}"]
    scores = dict(row["scores"])
    out = []
    if not all(0.0 <= v <= 1.0 for v in [*scores.values(), row["top_score"]]):
        out.append(f"scores_are_probabilities: {uri} has a score outside [0, 1]")
    labels = row["labels"]
    if any(lab not in scores for lab in labels) or any(
        scores[a] < scores[b] for a, b in itertools.pairwise(labels)
    ):
        out.append(f"labels_above_threshold_by_score: {uri} labels {labels} vs scores {scores}")
    if row["top_label"] not in scores or row["top_score"] != max(scores.values()):
        out.append(f"top_is_max: {uri} top {row['top_label']}={row['top_score']} vs {scores}")
    return out


# ================================================================================ plan


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: small (a list of URIs), picklable, enough to tag and write it."""

    shard_id: str
    part_uri: str
    uris: tuple[str, ...]
    model_version: str
    planned_by: str  # run id that claimed these images


@dataclass(frozen=True)
class RunPlan:
    """What a run will do; `shards` are its own new shards, then others' unfinished ones."""

    run_id: str
    source: str
    dataset: str
    dataset_uri: str
    partition_uri: str
    model_version: str
    shard_size: int
    shards: tuple[ShardSpec, ...]
    n_listed: int
    n_skipped: int  # listed images already in finished shards
    n_new: int  # images this run claimed
    n_resumed: int  # images of unfinished shards claimed by earlier runs
    epoch: int | None  # the epoch this run created, if it claimed anything
    baseline: ModelBaseline
    started_at: str
    plan_s: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pending(self) -> int:
        return sum(len(s.uris) for s in self.shards)


def resolve_model_version(params: TagParams) -> str:
    """The version to tag with: params.model_version, else the registry champion."""
    from multitag import registry

    if params.model_version:
        uri = join(registry.version_uri(params.home, params.model_version), registry.SUMS_FILE)
        if not exists(uri):
            raise registry.VersionNotFoundError(
                f"model version {params.model_version} is not a complete version under "
                f"{registry.models_uri(params.home)} (`multitag models list` shows them)"
            )
        return params.model_version
    champion = registry.get_champion(params.home)
    if champion is None:
        raise registry.NoChampionError(
            f"no champion model under {registry.models_uri(params.home)}: pass --model VERSION "
            "or run `multitag retrain` first"
        )
    return str(champion["version"])


def read_baseline(home: str | None, version: str) -> ModelBaseline:
    """Training label prevalence recorded with a registered model (metrics.json)."""
    from multitag import registry

    vdir = registry.version_uri(home, version)
    inference = read_json(join(vdir, registry.INFERENCE_FILE))
    metrics = read_json(join(vdir, registry.METRICS_FILE))
    return ModelBaseline.from_metrics(inference.get("vocab", []), metrics)


def output_uris(params: TagParams, model_version: str) -> tuple[str, str, str]:
    """(dataset uri, partition uri, claim-log uri) for these params and model version."""
    dataset = params.dataset_name or default_dataset_name(params.source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dataset):
        raise TaggingError(f"dataset_name {dataset!r} must be letters, digits, '.', '_', '-'")
    out = params.out or get_settings(params.home).tags
    dataset_uri = join(out, dataset)
    partition = join(dataset_uri, f"model={model_version}")
    return dataset_uri, partition, join(dataset_uri, PLANS_DIR, f"model={model_version}")


def new_run_id() -> str:
    """`20261128T123456.789Z-3fa9c2`: sorts by start time; the suffix keeps parallel runs apart."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def plan_run(
    params: TagParams,
    *,
    model_version: str | None = None,
    baseline: ModelBaseline | None = None,
    run_id: str | None = None,
) -> RunPlan:
    """List the source, claim the images no finished or planned shard holds, and shard them.

    Returns this run's new shards plus unfinished shards of earlier (killed or concurrent)
    runs, as references. See the module docstring for why this is exactly-once.
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    run_id = run_id or new_run_id()
    version = model_version or resolve_model_version(params)
    baseline = baseline or read_baseline(params.home, version)
    dataset_uri, partition, plans = output_uris(params, version)
    for folder in (partition, plans, join(dataset_uri, MANIFESTS_DIR)):
        remove_stale_temp_files(folder)

    import pyarrow as pa
    import pyarrow.compute as pc

    listing = pa.array(list(list_images(params.source)), type=pa.string())
    log = _ClaimLog.read(plans, partition)
    n_skipped = int(pc.sum(pc.is_in(listing, value_set=log.finished_uris())).as_py() or 0)
    new = listing.filter(pc.invert(pc.is_in(listing, value_set=log.claimed_uris())))
    epoch, own = _claim(plans, log, new, params, run_id)
    own_ids = {shard_id for shard_id, _ in own}
    orphans = [(sid, uris) for sid, uris in log.unfinished() if sid not in own_ids]
    orphans.sort(key=lambda item: item[0], reverse=True)
    shards = tuple(
        ShardSpec(
            sid,
            join(partition, f"part-{sid}.parquet"),
            tuple(uris),
            version,
            run_id if sid in own_ids else log.planned_by(sid),
        )
        for sid, uris in [*own, *orphans]
    )
    return RunPlan(
        run_id=run_id,
        source=params.source,
        dataset=posixpath.basename(dataset_uri),
        dataset_uri=dataset_uri,
        partition_uri=partition,
        model_version=version,
        shard_size=params.shard_size,
        shards=shards,
        n_listed=len(listing),
        n_skipped=n_skipped,
        n_new=sum(len(u) for _, u in own),
        n_resumed=sum(len(u) for _, u in orphans),
        epoch=epoch,
        baseline=baseline,
        started_at=started.isoformat(),
        plan_s=round(time.perf_counter() - t0, 3),
        params=params.model_dump(mode="json"),
    )


def _claim(
    plans: str, log: _ClaimLog, new: pa.Array, params: TagParams, run_id: str
) -> tuple[int | None, list[tuple[str, list[str]]]]:
    """Claim `new` as the next epoch; on a lost race, drop the winner's images and retry.

    Returns (the epoch created or None when nothing was left to claim, [(shard id, uris)]).
    """
    import pyarrow.compute as pc

    for _ in range(_MAX_EPOCH_TRIES):
        if len(new) == 0:
            return None, []
        candidate = log.next_epoch()
        try:
            return candidate, _write_epoch(
                plans, candidate, new, params.shard_size, run_id, params.source
            )
        except FileExistsError:
            log.absorb(plans, candidate)  # a concurrent run won this epoch: take its claims out
            new = new.filter(pc.invert(pc.is_in(new, value_set=log.claimed_uris())))
    raise TaggingError(f"could not claim an epoch in {plans} after {_MAX_EPOCH_TRIES} tries")


def _shard_id(epoch: int, index: int) -> str:
    return f"{epoch:06d}-{index:06d}"


def _epoch_uri(plans: str, epoch: int) -> str:
    return join(plans, f"epoch-{epoch:06d}.arrow")


def _write_epoch(
    plans: str, epoch: int, uris: pa.Array, shard_size: int, run_id: str, source: str
) -> list[tuple[str, list[str]]]:
    """Claim `uris` as epoch `epoch` (exclusive create); returns [(shard id, uris)]."""
    import pyarrow as pa

    n = len(uris)
    index = pa.array(np.arange(n, dtype=np.int64) // shard_size, type=pa.int32())
    meta = {
        "format": PLAN_FORMAT,
        "run_id": run_id,
        "epoch": str(epoch),
        "source": source,
        "shard_size": str(shard_size),
        "created_at": datetime.now(UTC).isoformat(),
    }
    table = pa.table({"shard": index, "image_uri": uris}).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    write_bytes_atomic(_epoch_uri(plans, epoch), sink.getvalue().to_pybytes(), exclusive=True)
    values = uris.to_pylist()
    return [
        (_shard_id(epoch, i), values[i * shard_size : (i + 1) * shard_size])
        for i in range(math.ceil(n / shard_size))
    ]


class _ClaimLog:
    """Every epoch of a partition's claim log, and which of its shards are finished."""

    def __init__(self, finished: set[str]) -> None:
        self.finished = finished
        self.epochs: dict[int, pa.Table] = {}
        self.run_ids: dict[int, str] = {}

    @classmethod
    def read(cls, plans: str, partition: str) -> _ClaimLog:
        log = cls(_finished_shard_ids(partition))
        for epoch in _list_epochs(plans):
            log.absorb(plans, epoch)
        return log

    def absorb(self, plans: str, epoch: int) -> None:
        import pyarrow as pa

        data = read_bytes(_epoch_uri(plans, epoch))
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        meta = table.schema.metadata or {}
        if meta.get(b"format") != PLAN_FORMAT.encode():
            raise TaggingError(f"{_epoch_uri(plans, epoch)} is not a {PLAN_FORMAT} claim file")
        self.epochs[epoch] = table
        self.run_ids[epoch] = meta.get(b"run_id", b"?").decode()

    def next_epoch(self) -> int:
        return max(self.epochs, default=0) + 1

    def claimed_uris(self) -> pa.Array:
        import pyarrow as pa

        chunks = [c for t in self.epochs.values() for c in t.column("image_uri").chunks]
        return pa.chunked_array(chunks, type=pa.string()).combine_chunks()

    def finished_uris(self) -> pa.Array:
        import pyarrow as pa
        import pyarrow.compute as pc

        done: dict[int, list[int]] = {}
        for sid in self.finished:
            epoch, index = (int(x) for x in sid.split("-"))
            done.setdefault(epoch, []).append(index)
        parts = []
        for epoch, table in self.epochs.items():
            value_set = pa.array(done.get(epoch, []), type=pa.int32())
            mask = pc.is_in(table.column("shard"), value_set=value_set)
            parts.extend(table.column("image_uri").filter(mask).chunks)
        return pa.chunked_array(parts, type=pa.string()).combine_chunks()

    def unfinished(self) -> list[tuple[str, list[str]]]:
        """(shard id, uris) of every claimed shard without a Parquet file, in id order."""
        out = []
        for epoch, table in sorted(self.epochs.items()):
            shard = table.column("shard").to_numpy()
            order = np.argsort(shard, kind="stable")
            ids, starts = np.unique(shard[order], return_index=True)
            ends = [*starts[1:], len(order)]
            uris = table.column("image_uri")
            for index, start, end in zip(ids, starts, ends, strict=True):
                sid = _shard_id(epoch, int(index))
                if sid not in self.finished:
                    rows = uris.take(order[start:end]).to_pylist()
                    out.append((sid, rows))
        return out

    def planned_by(self, shard_id: str) -> str:
        return self.run_ids.get(int(shard_id.split("-")[0]), "?")


def _fresh_ls(uri: str) -> list[str]:
    """Names directly under uri, bypassing fsspec's listing cache (other runs write here)."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    try:
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def _list_epochs(plans: str) -> list[int]:
    return sorted(int(m.group(1)) for n in _fresh_ls(plans) if (m := _EPOCH_RE.match(n)))


def _finished_shard_ids(partition: str) -> set[str]:
    return {m.group(1) for n in _fresh_ls(partition) if (m := _PART_RE.match(n))}


def _fresh_exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


# ================================================================================ shards


@dataclass(frozen=True)
class ShardResult:
    """What happened to one shard; small, so a flow can collect thousands of them.

    status: "written" (this call wrote it), "exists" (already finished, nothing done),
    "lost_race" (tagged, but another run wrote it first; these rows were dropped).
    """

    shard_id: str
    part_uri: str
    status: str
    n_images: int
    n_tagged: int = 0
    n_failed: int = 0
    n_none: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scorer: str = ""  # which scorer tagged it and why (`Tagger.precision_choice`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_shard(
    spec: ShardSpec,
    tagger: Tagger,
    *,
    run_id: str = "",
    on_batch: Callable[[int], None] | None = None,
) -> ShardResult:
    """Tag one shard and write its Parquet file whole, exactly once (see module docstring).

    Idempotent: a shard whose file exists is skipped without reading an image.
    """
    t0 = time.perf_counter()
    if tagger.model_version != spec.model_version:
        raise TaggingError(
            f"shard {spec.shard_id} belongs to model {spec.model_version} but the tagger holds "
            f"{tagger.model_version}"
        )
    if _fresh_exists(spec.part_uri):
        return ShardResult(spec.shard_id, spec.part_uri, "exists", len(spec.uris))
    rows: list[TagRow] = []
    prepare_s = model_s = 0.0
    for batch in tagger.tag(spec.uris, on_batch=on_batch):
        rows.extend(batch.rows)
        prepare_s += batch.prepare_s
        model_s += batch.model_s
    t_write = time.perf_counter()
    status = _write_shard(spec, rows, run_id)
    t_end = time.perf_counter()
    seconds = {"prepare_s": prepare_s, "model_s": model_s, "write_s": t_end - t_write,
               "total_s": t_end - t0}  # fmt: skip
    seconds = {k: round(v, 4) for k, v in seconds.items()}
    if status != "written":
        return ShardResult(spec.shard_id, spec.part_uri, status, len(rows), seconds=seconds)
    return dataclasses.replace(_count_rows(spec, rows, seconds), scorer=tagger.precision_choice)


def _write_shard(spec: ShardSpec, rows: Sequence[TagRow], run_id: str) -> str:
    """Exclusive create of the whole Parquet file: "written", or "lost_race" if it exists."""
    meta = {"multitag.shard_id": spec.shard_id, "multitag.run_id": run_id,
            "multitag.planned_by": spec.planned_by}  # fmt: skip
    data = _parquet_bytes(rows_to_table(rows, spec.model_version), meta)
    try:
        write_bytes_atomic(spec.part_uri, data, exclusive=True)
    except FileExistsError:
        return "lost_race"  # another run finished this shard first; our rows are dropped
    return "written"


def _count_rows(spec: ShardSpec, rows: Sequence[TagRow], seconds: dict[str, float]) -> ShardResult:
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    n_none = n_failed = 0
    for r in rows:
        if r.error is not None:
            n_failed += 1
            kinds[r.error.split(":", 1)[0]] += 1
        elif r.labels:
            labels.update(r.labels)
        else:
            n_none += 1
    return ShardResult(
        spec.shard_id,
        spec.part_uri,
        "written",
        len(rows),
        n_tagged=len(rows) - n_failed,
        n_failed=n_failed,
        n_none=n_none,
        label_counts=dict(labels),
        error_kinds=dict(kinds),
        seconds=seconds,
    )


# ================================================================================ drift


@dataclass(frozen=True)
class DriftRule:
    """When a label's rate in a run has moved enough from training to flag it.

    Flagged when the run tagged at least `min_images` images, the rates differ by at least
    `min_abs_diff` (absolute), AND the rate of the label or of its absence changed by a
    factor of at least `min_ratio` either way. Looking at the absence too keeps the rule
    symmetric for common labels, which can never double: 2% -> 5% is not flagged (too
    small), 2% -> 30% is; 60% -> 75% is not (absence 40% -> 25%), 60% -> 90% is (absence
    40% -> 10%), 60% -> 20% is. A label never seen in training is flagged at `min_abs_diff`.
    """

    min_images: int = 100
    min_abs_diff: float = 0.10
    min_ratio: float = 2.0

    def flags(self, rate: float, train_rate: float | None, n_images: int) -> bool:
        if train_rate is None or n_images < self.min_images:
            return False
        if abs(rate - train_rate) < self.min_abs_diff:
            return False
        return self._moved(rate, train_rate) or self._moved(1.0 - rate, 1.0 - train_rate)

    def _moved(self, now: float, before: float) -> bool:
        if before <= 0:
            return now > 0
        ratio = now / before
        return ratio >= self.min_ratio or ratio <= 1.0 / self.min_ratio


@dataclass(frozen=True)
class LabelRate:
    label: str
    count: int
    rate: float | None  # share of this run's tagged (non-error) images
    train_rate: float | None
    flagged: bool


@dataclass(frozen=True)
class DriftReport:
    n_images: int
    baseline_available: bool
    note: str
    rule: dict[str, float]
    labels: list[LabelRate]
    none: LabelRate
    flagged: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_drift(
    label_counts: Mapping[str, int],
    n_none: int,
    n_images: int,
    baseline: ModelBaseline,
    rule: DriftRule | None = None,
) -> DriftReport:
    """Rates of each label and of "no label" in this run next to training prevalence."""
    rule = rule or DriftRule()
    prev = baseline.train_label_prevalence
    available = prev is not None

    def rate_of(count: int) -> float | None:
        return round(count / n_images, 6) if n_images else None

    def entry(label: str, count: int, train: float | None) -> LabelRate:
        rate = rate_of(count)
        flagged = rate is not None and rule.flags(rate, train, n_images)
        return LabelRate(label, count, rate, train, flagged)

    vocab = list(baseline.vocab) + sorted(set(label_counts) - set(baseline.vocab))
    labels = [entry(lab, int(label_counts.get(lab, 0)), (prev or {}).get(lab)) for lab in vocab]
    none = entry(NONE_LABEL, n_none, baseline.train_none_rate)
    if not available:
        note = (
            "the model's metrics.json has no train_label_prevalence: rates are shown "
            "without a training baseline and nothing is flagged"
        )
    elif n_images < rule.min_images:
        note = f"only {n_images} images tagged (< {rule.min_images}): too few to flag drift"
    else:
        note = "rates are shares of this run's tagged (non-error) images"
    flagged = [e.label for e in [*labels, none] if e.flagged]
    return DriftReport(n_images, available, note, asdict(rule), labels, none, flagged)


# ============================================================================ summary


@dataclass(frozen=True)
class TagProgress:
    images_done: int
    images_total: int
    shards_done: int
    shards_total: int
    elapsed_s: float


@dataclass(frozen=True)
class TagSummary:
    """A run's outcome; `to_dict()` is the manifest."""

    run_id: str
    status: str  # "completed" or "failed"
    model_version: str
    source: str
    dataset: str
    output_uri: str
    manifest_uri: str
    listed: int
    tagged: int
    failed: int
    skipped: int
    resumed: int
    shards_written: int
    shards_skipped: int
    images_per_s: float | None
    started_at: str
    finished_at: str
    seconds: dict[str, float]
    error_kinds: dict[str, int]
    drift: DriftReport
    shards: list[ShardResult]
    params: dict[str, Any]
    error: str | None = None
    scorers: list[str] = field(default_factory=list)  # distinct `ShardResult.scorer` values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        """The few lines a person reads at the end of `multitag tag`."""
        rate = f"{self.images_per_s:.1f} images/s" if self.images_per_s else "n/a images/s"
        lines = [
            f"run {self.run_id} ({self.status}) with model {self.model_version}",
            f"listed {self.listed}: tagged {self.tagged}, failed {self.failed}, "
            f"skipped {self.skipped} (already tagged)"
            + (f", resumed {self.resumed} from earlier runs" if self.resumed else ""),
            f"{self.shards_written} shard(s) written, {rate}, "
            f"{self.seconds.get('total_s', 0.0):.1f} s",
            f"output:   {self.output_uri}",
            f"manifest: {self.manifest_uri}",
        ]
        lines += [f"scorer:   {s}" for s in self.scorers]
        if self.error_kinds:
            lines.append(
                "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(self.error_kinds.items()))
            )
        if self.drift.flagged:
            moved = {e.label: e for e in [*self.drift.labels, self.drift.none]}
            parts = [
                f"{lab} {moved[lab].rate:.2f} vs {moved[lab].train_rate:.2f} in training"
                for lab in self.drift.flagged
            ]
            lines.append("DRIFT: " + "; ".join(parts))
        elif self.drift.note:
            lines.append(f"drift: {self.drift.note}")
        if self.error:
            lines.append(f"ERROR: {self.error}")
        return "\n".join(lines)


def manifest_uri(plan: RunPlan) -> str:
    return join(plan.dataset_uri, MANIFESTS_DIR, f"{plan.run_id}.json")


def summarize_run(
    plan: RunPlan,
    results: Sequence[ShardResult],
    *,
    drift_rule: DriftRule | None = None,
    tag_s: float | None = None,
    error: str | None = None,
) -> TagSummary:
    """Fold shard results into the run's summary (counts, rates, drift, timings)."""
    finished = datetime.now(UTC)
    written = [r for r in results if r.status == "written"]
    others = [r for r in results if r.status != "written"]
    tagged = sum(r.n_tagged for r in written)
    failed = sum(r.n_failed for r in written)
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for r in written:
        labels.update(r.label_counts)
        kinds.update(r.error_kinds)
    n_none = sum(r.n_none for r in written)
    total_s = (finished - datetime.fromisoformat(plan.started_at)).total_seconds()
    tag_s = tag_s if tag_s is not None else max(total_s - plan.plan_s, 0.0)
    n_done = tagged + failed
    return TagSummary(
        run_id=plan.run_id,
        status="failed" if error else "completed",
        model_version=plan.model_version,
        source=plan.source,
        dataset=plan.dataset,
        output_uri=plan.partition_uri,
        manifest_uri=manifest_uri(plan),
        listed=plan.n_listed,
        tagged=tagged,
        failed=failed,
        skipped=plan.n_skipped + sum(r.n_images for r in others),
        resumed=plan.n_resumed,
        shards_written=len(written),
        shards_skipped=len(others),
        images_per_s=round(n_done / tag_s, 2) if n_done and tag_s > 0 else None,
        started_at=plan.started_at,
        finished_at=finished.isoformat(),
        seconds={
            "plan_s": plan.plan_s,
            "tag_s": round(tag_s, 3),
            "total_s": round(total_s, 3),
            **_stage_seconds(written),
        },
        error_kinds=dict(kinds),
        drift=compute_drift(labels, n_none, tagged, plan.baseline, drift_rule),
        shards=list(results),
        params=plan.params,
        error=error,
        scorers=sorted({r.scorer for r in written if r.scorer}),
    )


def _stage_seconds(results: Iterable[ShardResult]) -> dict[str, float]:
    keys = ("prepare_s", "model_s", "write_s")
    return {f"sum_{k}": round(sum(r.seconds.get(k, 0.0) for r in results), 3) for k in keys}


def write_manifest(summary: TagSummary) -> str:
    """Write `_manifests/<run-id>.json` (exclusive: a run id is written once); returns its URI."""
    write_json_atomic(summary.manifest_uri, summary.to_dict(), exclusive=True)
    return summary.manifest_uri


# ============================================================================ in-process


def tag_source(
    params: TagParams,
    *,
    tagger: Tagger | None = None,
    progress: Callable[[TagProgress], None] | None = None,
    run_id: str | None = None,
    drift_rule: DriftRule | None = None,
) -> TagSummary:
    """Plan, tag every pending shard in this process, write the manifest; the CLI/library path.

    `tagger=None` loads the registry model (champion unless params.model_version) only if
    there is something to tag. Shards run `params.max_concurrency` at a time. If a shard
    fails, the manifest is still written (status "failed") and the exception re-raised;
    rerunning resumes.
    """
    if tagger is not None and params.model_version not in (None, tagger.model_version):
        raise TaggingError(
            f"params.model_version={params.model_version} but the tagger holds "
            f"{tagger.model_version}"
        )
    version = tagger.model_version if tagger is not None else resolve_model_version(params)
    baseline = tagger.baseline if tagger is not None else None
    plan = plan_run(params, model_version=version, baseline=baseline, run_id=run_id)
    if plan.shards and tagger is None:
        tagger = tagger_for(params, version)  # only load a model when there is work
    t0 = time.perf_counter()
    results: list[ShardResult] = []
    error: Exception | None = None
    if plan.shards and tagger is not None:
        results, error = _run_shards(plan, tagger, params.max_concurrency, progress, t0)
    summary = summarize_run(
        plan,
        results,
        drift_rule=drift_rule,
        tag_s=time.perf_counter() - t0,
        error=None if error is None else repr(error),
    )
    write_manifest(summary)
    if error is not None:
        raise error
    return summary


def _run_shards(
    plan: RunPlan,
    tagger: Tagger,
    max_concurrency: int,
    progress: Callable[[TagProgress], None] | None,
    t0: float,
) -> tuple[list[ShardResult], Exception | None]:
    """Tag the plan's shards; on the first failure, stop starting new ones.

    Returns the results of the shards that finished and the first error (or None), so the
    caller can still record what was written.
    """
    lock = threading.Lock()
    state = {"images": 0, "shards": 0}
    total = plan.n_pending

    def report() -> None:
        if progress is not None:
            progress(
                TagProgress(
                    state["images"],
                    total,
                    state["shards"],
                    len(plan.shards),
                    time.perf_counter() - t0,
                )
            )

    def on_batch(n: int) -> None:
        with lock:
            state["images"] += n
            report()

    def one(spec: ShardSpec) -> ShardResult:
        result = tag_shard(spec, tagger, run_id=plan.run_id, on_batch=on_batch)
        with lock:
            state["shards"] += 1
            if result.status == "exists":
                state["images"] += result.n_images
            report()
        return result

    results: list[ShardResult] = []
    if max_concurrency <= 1:
        for spec in plan.shards:
            try:
                results.append(one(spec))
            except Exception as exc:
                return results, exc
        return results, None
    error: Exception | None = None
    with ThreadPoolExecutor(max_concurrency, thread_name_prefix="multitag-shard") as pool:
        futures = [pool.submit(one, spec) for spec in plan.shards]
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:
                if error is None:
                    error = exc
                    for pending in futures:
                        pending.cancel()
            except CancelledError:
                continue
    return results, error
