"""The Tagger: a chosen scorer, its input spec and thresholds, and the decode pipeline.

Why a module of its own: what turns image bytes into labels (read, decode, batch, score,
threshold, rows) changes for other reasons than how a registry version becomes a scorer
(multitag.inference.loading) or which scorer is fast enough (multitag.inference.selection).
The scorer is chosen first; a Tagger is built once with it and never patched.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from multitag.errors import RunFailedError
from multitag.inference.faults import TaggingError, read_error_reason
from multitag.inference.imaging import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    DecodedImage,
    ImageDecodeError,
    decode_image,
)
from multitag.inference.reading import DEFAULT_MAX_BYTES, read_many
from multitag.inference.scorers import Scorer
from multitag.inference.spec import InferenceSpec, ModelBaseline
from multitag.inference.torch_scorer import TorchScorer, torch_precision
from multitag.runtime import available_cpus, pick_device
from multitag.training.calibration import Calibration
from multitag.training.thresholds import ThresholdSet, apply_thresholds


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


_POLL_S = 0.5
_stop = threading.Event()


class StopRequested(RunFailedError):
    """This process was asked to stop (SIGTERM): the batch in progress is abandoned."""


def request_stop() -> None:
    """Make every `Tagger.tag` in this process raise StopRequested within `_POLL_S`.

    Why: a run sent SIGTERM must end within seconds, and the shard in progress (a thousand
    images, or one read that hangs) would otherwise hold it until done. Its rows are not
    written; a rerun tags them.
    """
    _stop.set()


def clear_stop() -> None:
    """Allow tagging again (a new run in a process that stopped one)."""
    _stop.clear()


def _polled_result(fut: Future[_Prepared]) -> _Prepared:
    """`fut.result()`, waited for in short steps, unless a stop is requested.

    Why: Prefect delivers a task's timeout (and a cancel) to a worker thread as an
    asynchronous exception, which lands only when that thread runs Python code; one long
    C-level wait on a hung read would never see it, nor `request_stop`.
    """
    while True:
        if _stop.is_set():
            raise StopRequested("tagging stopped on request (SIGTERM); rerun to tag the rest")
        if fut.done():
            return fut.result()
        wait((fut,), timeout=_POLL_S)


class Tagger:
    """A model ready to tag: scorer, input spec, thresholds, and the decode pipeline.

    Build it once per process (`loading.tagger_for`, `Tagger.from_learner`)
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
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        background: tuple[int, int, int] = WHITE,
        draft: bool = True,
        precision_choice: str | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        """`precision_choice`: which scorer runs and why, for the log and the manifest
        (default: the scorer's precision). `calibration`: the version's calibration.json;
        None writes the scorer's raw probabilities (versions registered without one)."""
        if list(thresholds.vocab) != list(spec.vocab):
            raise TaggingError(
                f"thresholds vocab {list(thresholds.vocab)} differs from the model vocab "
                f"{list(spec.vocab)}; they must come from the same model version"
            )
        if calibration is not None and list(calibration.vocab) != list(spec.vocab):
            raise TaggingError(
                f"calibration vocab {list(calibration.vocab)} differs from the model vocab "
                f"{list(spec.vocab)}; they must come from the same model version"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.scorer = scorer
        self.spec = spec
        self.thresholds = thresholds
        self.calibration = calibration
        self.model_version = model_version
        self.baseline = baseline or ModelBaseline(vocab=spec.vocab)
        self.batch_size = batch_size
        self.decode_workers = decode_workers or default_decode_workers()
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes  # files over it are error rows, never read (sources)
        self.background = background
        self.draft = draft  # reduced-scale JPEG decoding (imaging.decode_image)
        # [fastpath] which scorer runs and why (multitag.inference.loading chose it).
        self.precision_choice = precision_choice or str(
            getattr(scorer, "precision", type(scorer).__name__)
        )
        _allow_pixels(max_pixels)

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
        """From a fastai learner; `spec=None` reads its Resize/Normalize transforms.

        `precision="fp32"` is the exact mode: fp32 scores of fastai's own pixels (no
        reduced-scale JPEG decoding), so scores equal `get_preds`'s.
        """
        kwargs.setdefault("draft", precision != "fp32")

        spec = spec or InferenceSpec.from_learner(learn)
        dev = pick_device(device)
        scorer = TorchScorer(
            learn.model,
            mean=spec.mean,
            std=spec.std,
            n_labels=len(spec.vocab),
            device=dev,
            precision=torch_precision(precision),
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

    @property
    def scorer_note(self) -> str:
        """What a manifest records: the scorer, why it was picked, and an exact decode (so a
        user who needs fastai's own scores can see that a run had them)."""
        exact = "" if self.draft else "; exact decode (every pixel, as fastai decodes)"
        return self.precision_choice + exact + "; " + self.calibration_note

    @property
    def score_thresholds(self) -> dict[str, float]:
        """The thresholds in the scale of the written scores: a label is in `labels` when its
        raw score > its threshold, which is `score > score_threshold` (strictly increasing map;
        only where calibrated scores round to the same float can the two disagree)."""
        raw = self.thresholds.as_array()
        mapped = raw if self.calibration is None else self.calibration.map_thresholds(raw)
        return {v: float(t) for v, t in zip(self.vocab, mapped, strict=True)}

    @property
    def calibration_note(self) -> str:
        """What the manifest says about `scores`: calibrated (and the thresholds in their
        scale) or the raw probabilities of a version without calibration.json."""
        if self.calibration is None:
            return "scores uncalibrated (raw sigmoid; this version has no calibration.json)"
        cal = self.calibration
        fitted = sum(f.fitted for f in cal.labels.values())
        thr = ", ".join(f"{v}: {t:.4g}" for v, t in self.score_thresholds.items())
        return (
            f"scores calibrated (calibration.json, {cal.method}: {fitted} of {len(cal.vocab)} "
            f"labels fitted, the rest identity); labels = raw score > threshold = "
            f"score > {{{thr}}}"
        )

    def decode(self, data: bytes) -> DecodedImage:
        return decode_image(
            data,
            self.spec.img_size,
            resize_method=self.spec.resize_method,  # type: ignore[arg-type]
            pad_mode=self.spec.pad_mode,  # type: ignore[arg-type]
            max_pixels=self.max_pixels,
            background=self.background,
            draft=self.draft,
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

    def tag_batch(self, uris: Sequence[str]) -> list[TagRow]:
        """Rows for `uris`, read, decoded and scored in the calling thread (no prefetch).

        For work that must be stoppable between small batches (`multitag.tagging.headstart`).
        """
        return self._score(self._prepare(list(uris)))

    def _prepared_batches(self, uris: Sequence[str]) -> Iterator[_Prepared]:
        """Prepare up to `decode_workers` batches ahead of the one being scored.

        Memory is bounded by (decode_workers + 1) batches, whatever len(uris) is.
        """
        batches = (
            list(uris[i : i + self.batch_size]) for i in range(0, len(uris), self.batch_size)
        )
        pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="multitag-decode")
        pending: deque[Future[_Prepared]] = deque()
        finished = False
        try:
            for batch in batches:
                pending.append(pool.submit(self._prepare, batch))
                if len(pending) > self.decode_workers:
                    yield _polled_result(pending.popleft())
            while pending:
                yield _polled_result(pending.popleft())
            finished = True
        finally:
            # Stopped early (a shard timeout, a cancel, an error): a read may be hung, so do
            # not wait for the batches in progress; those not started are cancelled.
            pool.shutdown(wait=finished, cancel_futures=True)

    def _prepare(self, uris: list[str]) -> _Prepared:
        t0 = time.perf_counter()
        items: list[DecodedImage | str] = []
        for blob in read_many(uris, max_bytes=self.max_bytes):
            if isinstance(blob, OSError):
                items.append(read_error_reason(blob))
                continue
            try:
                items.append(self.decode(blob))
            except ImageDecodeError as exc:
                items.append(exc.reason)
        return _Prepared(uris, items, time.perf_counter() - t0)

    def _score(self, prepared: _Prepared) -> list[TagRow]:
        ok = [i for i, item in enumerate(prepared.items) if isinstance(item, DecodedImage)]
        now = datetime.now(UTC)
        rows: list[TagRow | None] = [None] * len(prepared.uris)
        if ok:
            batch = np.stack([prepared.items[i].array for i in ok])  # type: ignore[union-attr]
            probs = self.scorer.score_batch(batch)
            # Decisions on the raw scores, as the thresholds were chosen; the calibrated map
            # is strictly increasing per label, so it decides the same labels.
            decisions = apply_thresholds(probs, self.thresholds)
            scores = probs if self.calibration is None else self.calibration.apply(probs)
            for k, i in enumerate(ok):
                image: DecodedImage = prepared.items[i]  # type: ignore[assignment]
                rows[i] = self._row(prepared.uris[i], scores[k], decisions[k], image, now)
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
    return max(2, min(8, available_cpus() - 1))


def _allow_pixels(max_pixels: int | None) -> None:
    """Let our own, stricter-per-call check govern sizes up to `max_pixels`.

    Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS while opening (process-wide); a
    limit configured above that must widen it, or those images would fail with Pillow's
    generic error. Only ever raised, never lowered.
    """
    current = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and current is not None and max_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_pixels
