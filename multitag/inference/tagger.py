"""The model side of tagging: input spec, scorers, the Tagger, and loading one from the registry.

Why a module of its own: what turns image bytes into labels (decode, batch, score, threshold)
and how a registry version becomes a scorer (sha256 checks, the export-time fast path, the
no-unpickling paths) change for other reasons than planning and writing shards.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from multitag.config import TagParams, default_home
from multitag.inference.imaging import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    DecodedImage,
    ImageDecodeError,
    decode_image,
)
from multitag.inference.sources import (
    DEFAULT_MAX_BYTES,
    TaggingError,
    list_images,
    read_error_reason,
    read_many,
)

if TYPE_CHECKING:
    from multitag.training.thresholds import ThresholdSet

# ================================================================ model input + scoring


@dataclass(frozen=True)
class InferenceSpec:
    """How the model wants its input: inference.json, as multitag.training.learner writes it."""

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
                "inputs were prepared (multitag.training.learner.inference_spec writes it)"
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
    # path that multitag.inference.fastpath measured to keep the thresholds' decisions.
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


_POLL_S = 0.5
_stop = threading.Event()


class StopRequested(Exception):
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
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        background: tuple[int, int, int] = WHITE,
        draft: bool = True,
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
        self.max_bytes = max_bytes  # files over it are error rows, never read (sources)
        self.background = background
        self.draft = draft  # reduced-scale JPEG decoding (imaging.decode_image)
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
        """From a fastai learner; `spec=None` reads its Resize/Normalize transforms.

        `precision="fp32"` is the exact mode: fp32 scores of fastai's own pixels (no
        reduced-scale JPEG decoding), so scores equal `get_preds`'s.
        """
        from multitag.runtime import pick_device

        kwargs.setdefault("draft", precision != "fp32")

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

    @property
    def scorer_note(self) -> str:
        """What a manifest records: the scorer, why it was picked, and an exact decode (so a
        user who needs fastai's own scores can see that a run had them)."""
        exact = "" if self.draft else "; exact decode (every pixel, as fastai decodes)"
        return self.precision_choice + exact

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
        from multitag.training.thresholds import apply_thresholds

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
        max_bytes=params.max_bytes,
    )
    if record is not None:
        _use_recorded_torch_path(tagger, record, params)
    else:
        if why:
            logging.getLogger(__name__).warning("%s: checking a fast path on this machine", why)
        _use_fast_path(tagger, loaded, params)
    return tagger


# [fastpath] wiring of precision auto/int8 to multitag.inference.fastpath (performance helper).
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
    from multitag.inference import fastpath

    try:
        record = fastpath.FastPathRecord.from_json(meta.fastpath)
    except (fastpath.FastPathError, KeyError, TypeError, ValueError) as exc:
        return None, f"model {meta.version}: its fastpath.json is not usable ({exc})"
    if record.model_sha256 != meta.sha256 or record.n_labels != len(meta.thresholds.vocab):
        return None, f"model {meta.version}: its fastpath.json describes another model file"
    return record, ""


def _choose_recorded(record: Any, params: TagParams) -> tuple[str, str]:
    from multitag.inference import fastpath

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
    """A Tagger over the version's own fast-path file (ONNX, the bf16 torch program or the
    compiled bf16 package) when the recorded choice has one; None when it needs the learner
    (torch fp32, or a bf16 pick whose architecture could not be exported as a program)."""
    from multitag.inference import fastpath
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
    scorer = fastpath.file_scorer(name, path, mean=spec.mean, std=spec.std, n_labels=n_labels)
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
        max_bytes=params.max_bytes,
    )
    tagger.precision_choice = choice
    logging.getLogger(__name__).info("precision %s -> %s", params.precision, choice)
    return tagger


def _use_recorded_torch_path(tagger: Tagger, record: Any, params: TagParams) -> None:
    """The export-time record picked a torch scorer (bf16, or fp32 when nothing faster agreed)."""
    from multitag.inference import fastpath

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
    machine (then cached by its sha256; see multitag.inference.fastpath).
    """
    scorer = tagger.scorer
    if params.precision not in ("auto", "int8") or not isinstance(scorer, TorchScorer):
        return
    if scorer.device.type != "cpu":
        if params.precision == "int8":
            raise TaggingError("precision=int8 runs on CPU only; use auto, fp32 or bf16 on GPU")
        return
    from multitag.inference import fastpath

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
    from multitag.inference import fastpath

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
    "max_bytes",
}


@functools.lru_cache(maxsize=2)
def _cached_tagger(key_json: str) -> Tagger:
    import json

    fields = json.loads(key_json)
    params = TagParams(**fields)
    return load_tagger(params, fields["model_version"])
