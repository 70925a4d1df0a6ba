"""From a registry version to a Tagger: the scorer is chosen first, then the Tagger is built.

Why a module of its own: how a version becomes a scorer (sha256 checks, the export-time
fast-path record, the cached tag-time check, the paths that never unpickle the learner) is
policy over files, apart from what the Tagger does with a scorer once it has one.

The order, for precision `auto`/`int8` on the CPU: the version's own fast-path record when it
has one (a file candidate runs without unpickling the learner or importing fastai); else a
verified ONNX file cached by an earlier check on this machine; else the learner is unpickled
and the fast path is checked on a sample of the images to tag (multitag.inference.selection).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from multitag.config import TagParams, default_home
from multitag.hashing import sha256_uri
from multitag.inference import selection
from multitag.inference.faults import TaggingError
from multitag.inference.imaging import DecodedImage
from multitag.inference.records import (
    DEFAULT_AGREEMENT_BAR,
    ORT_FP32,
    ORT_INT8,
    TORCH_BF16,
    FastPathError,
    FastPathRecord,
    load_record,
)
from multitag.inference.sampling import decode_spread
from multitag.inference.scorers import Scorer, file_scorer, make_scorer
from multitag.inference.sources import list_images
from multitag.inference.spec import InferenceSpec, ModelBaseline, spec_decoder
from multitag.inference.tagger import Tagger
from multitag.inference.torch_scorer import TorchScorer, bf16_scorer, torch_precision
from multitag.registry import load_metadata, resolve_model_ref, unpickle_model, verified_file
from multitag.registry.layout import CALIBRATION_FILE, THRESHOLDS_FILE, version_uri
from multitag.runtime import pick_device
from multitag.storage import join, read_json
from multitag.training import operating_point
from multitag.training.calibration import Calibration, CalibrationError
from multitag.training.threshold_set import ThresholdSet

log = logging.getLogger(__name__)

# A chosen scorer and the note that says which and why (None: the scorer's own precision).
Chosen = tuple[Scorer, str | None]


def load_tagger(params: TagParams, model_version: str | None = None) -> Tagger:
    """Load a registry model (sha256-verified), choose its scorer, and build the Tagger.

    When the fast path `precision` picks has a file of its own (recorded with the version at
    export: ONNX fp32/int8, the bf16 torch program or the compiled bf16 package; for older
    versions, an ONNX file cached after a check on this machine), the learner is not
    unpickled and fastai is not imported (seconds per process on a small CPU). Otherwise the
    full load.
    """
    if model_version is None and params.model:  # NAME or NAME@VERSION: to a version id
        model_version = resolve_model_ref(params.home, params.model)
    meta = load_metadata(params.home, model_version)
    spec = InferenceSpec.from_dict(meta.inference)
    record, why = _export_record(meta, params)
    chosen = (
        _registry_scorer(meta, spec, params, record)
        if record
        else _cached_onnx_scorer(meta, spec, params)
    )
    if chosen is None:
        chosen = _learner_scorer(unpickle_model(meta), spec, params, record, why)
    scorer, choice = chosen
    point = resolve_operating_point(meta.thresholds, params)
    if point.kind != "training":
        log.warning(
            "operating point %s: thresholds %s%s; %s",
            point.kind,
            point.thresholds.per_label,
            f" (never predicted: {point.never})" if point.never else "",
            operating_point.FASTPATH_NOTE,
        )
    return Tagger(
        scorer,
        spec=spec,
        thresholds=point.thresholds,
        model_version=meta.version,
        baseline=ModelBaseline.from_metrics(spec.vocab, meta.metrics),
        batch_size=params.batch_size,
        decode_workers=params.decode_workers,
        max_pixels=params.max_pixels,
        max_bytes=params.max_bytes,
        draft=params.precision != "fp32",  # fp32 is the exact mode: fastai's own pixels
        precision_choice=choice,
        calibration=_calibration(meta),
    )


def _calibration(meta: Any) -> Calibration | None:
    """The version's calibration.json, hashed against SHA256SUMS; None for versions
    registered without one (their scores stay the raw probabilities, and the manifest says so)."""
    if CALIBRATION_FILE not in meta.sums:
        return None
    path = verified_file(meta, CALIBRATION_FILE)
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (CalibrationError, KeyError, TypeError, ValueError) as exc:
        why = f"model {meta.version}: its {CALIBRATION_FILE} is not usable: {exc}"
        raise TaggingError(why) from exc


# [fastpath] wiring of precision auto/int8 to multitag.inference.selection.
def _wants_fast_path(params: TagParams) -> bool:
    return params.precision in ("auto", "int8") and pick_device(params.device) == "cpu"


def _export_record(meta: Any, params: TagParams) -> tuple[FastPathRecord | None, str]:
    """The version's export-time fast-path record when this run can use it, and if not, why.

    The record's files were hashed with the version; a record that cannot be read or that
    belongs to another model file is not used (the run checks a fast path itself instead).
    """
    if meta.fastpath is None or not _wants_fast_path(params):
        return None, ""
    try:
        record = FastPathRecord.from_json(meta.fastpath)
    except (FastPathError, KeyError, TypeError, ValueError) as exc:
        return None, f"model {meta.version}: its fastpath.json is not usable ({exc})"
    if record.model_sha256 != meta.sha256 or record.n_labels != len(meta.thresholds.vocab):
        return None, f"model {meta.version}: its fastpath.json describes another model file"
    return record, ""


def _choose_recorded(record: FastPathRecord, params: TagParams) -> tuple[str, str]:
    try:
        name, reason = selection.choose_for_run(record, params.precision, DEFAULT_AGREEMENT_BAR)
    except FastPathError as exc:
        raise TaggingError(str(exc)) from exc
    where = record.extra.get("check_set", "sampled images")
    return name, f"{reason}; checked at export on {record.n_check} {where} images"


def _named(name: str, reason: str) -> str:
    """`name: reason`, without naming the scorer twice (`agreement.choose` reasons often
    start with it)."""
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


def _logged(params: TagParams, scorer: Scorer, choice: str) -> Chosen:
    log.info("precision %s -> %s", params.precision, choice)
    return scorer, choice


def _registry_scorer(
    meta: Any, spec: InferenceSpec, params: TagParams, record: FastPathRecord
) -> Chosen | None:
    """The scorer over the version's own fast-path file (ONNX, the bf16 torch program or the
    compiled bf16 package) when the recorded choice has one; None when it needs the learner
    (torch fp32, or a bf16 pick whose architecture could not be exported as a program)."""
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
    scorer = file_scorer(name, path, mean=spec.mean, std=spec.std, n_labels=len(spec.vocab))
    return _logged(params, scorer, f"{_named(name, reason)} (learner not unpickled)")


def _cached_onnx_scorer(meta: Any, spec: InferenceSpec, params: TagParams) -> Chosen | None:
    """The cached, verified ONNX scorer `precision` would pick; else None.

    For versions without an export-time record. None (so the learner is loaded) when:
    precision is fp32/bf16; the device is not the CPU; no record exists for this model's
    sha256 or a cached file fails its sha256 check (`records.load_record`); or the scorer
    the record picks is a torch one (it needs the learner).
    """
    if not _wants_fast_path(params):
        return None
    record = load_record(meta.sha256)
    if record is None or record.n_labels != len(spec.vocab):
        return None
    if params.precision == "int8" and ORT_INT8 not in record.candidates:
        return None
    try:
        name, reason = selection.choose_for_run(record, params.precision, DEFAULT_AGREEMENT_BAR)
    except FastPathError:
        return None
    if name not in (ORT_FP32, ORT_INT8):
        return None
    scorer = make_scorer(name, record, None, mean=spec.mean, std=spec.std, n_labels=len(spec.vocab))
    choice = f"{_named(name, reason)} (cached fast path; learner not unpickled)"
    return _logged(params, scorer, choice)


def _learner_scorer(
    loaded: Any,
    spec: InferenceSpec,
    params: TagParams,
    record: FastPathRecord | None,
    why: str,
) -> Chosen:
    """The scorer over the unpickled learner: torch as `precision` asks, or the fast path.

    With an export-time record that picked a torch scorer: bf16 (or fp32 when nothing faster
    agreed). Without one, for `auto`/`int8` on the CPU: the fast path checked against this
    fp32 model on a sample of `params.source` the first time a model file is used on a
    machine (then cached by its sha256; see multitag.inference.selection).
    """
    n_labels = len(spec.vocab)
    torch = TorchScorer(
        loaded.learner.model,
        mean=spec.mean,
        std=spec.std,
        n_labels=n_labels,
        device=pick_device(params.device),
        precision=torch_precision(params.precision),
    )
    if record is not None:
        name, reason = _choose_recorded(record, params)
        scorer = (
            bf16_scorer(torch.model, spec.mean, spec.std, n_labels) if name == TORCH_BF16 else torch
        )
        return _logged(params, scorer, _named(name, reason))
    if why:
        log.warning("%s: checking a fast path on this machine", why)
    if params.precision not in ("auto", "int8"):
        return torch, None
    if torch.device.type != "cpu":
        if params.precision == "int8":
            raise TaggingError("precision=int8 runs on CPU only; use auto, fp32 or bf16 on GPU")
        return torch, None
    decode = spec_decoder(spec, max_pixels=params.max_pixels, draft=True)
    try:
        picked = selection.select_scorer(
            torch.model,
            precision=params.precision,
            mean=spec.mean,
            std=spec.std,
            img_size=spec.img_size,
            thresholds=loaded.thresholds,
            model_sha256=loaded.sha256,
            sample=lambda n: sample_images(params.source, decode, n),
            batch_size=params.batch_size,
        )
    except FastPathError as exc:
        raise TaggingError(str(exc)) from exc
    return picked.scorer, _named(picked.name, picked.reason)


def sample_images(
    source: str, decode: Callable[[bytes], DecodedImage], n: int
) -> np.ndarray | None:
    """Up to n decoded images spread evenly over the listing of `source`; None if < n listed
    or none decodes (multitag.inference.sampling)."""
    try:
        uris = list(list_images(source))
    except (FileNotFoundError, TaggingError):
        return None
    if len(uris) < n:
        return None
    batch = decode_spread(uris, n, decode)
    return batch if len(batch) else None


def tagger_for(params: TagParams, model_version: str) -> Tagger:
    """`load_tagger`, cached per process: every shard task on a worker reuses one model."""
    key = params.model_copy(update={"model": model_version, "home": params.home or default_home()})
    # A thresholds file edited between two runs in one process must not reuse the tagger
    # built from its old contents: its sha256 is part of the key (the path alone is not).
    content = sha256_uri(params.thresholds_file) if params.thresholds_file else ""
    return _cached_tagger(key.model_dump_json(include=_TAGGER_FIELDS), content)


_TAGGER_FIELDS = {
    "source",  # [fastpath] precision auto samples it when a model's fast path is unchecked
    "home",
    "model",
    "device",
    "precision",
    "batch_size",
    "decode_workers",
    "max_pixels",
    "max_bytes",
    "min_precision",  # the operating point: another one is another Tagger
    "thresholds_file",
}


def resolve_operating_point(
    thresholds: ThresholdSet, params: TagParams
) -> operating_point.OperatingPoint:
    """The operating point `params` ask for, over the model's training thresholds; a file
    or a target that cannot be applied is a TaggingError (exit 2, not retried)."""
    try:
        return operating_point.resolve(
            thresholds,
            min_precision=params.min_precision,
            thresholds_file=params.thresholds_file,
        )
    except operating_point.OperatingPointError as exc:
        raise TaggingError(str(exc)) from exc


def operating_point_for(params: TagParams, model_version: str) -> dict[str, Any]:
    """The manifest's record of the operating point a run of `params` applies.

    Read from the version's thresholds.json without loading the model, so the plan checks a
    bad thresholds file or target before anything is claimed (the shard's Tagger, built with
    sha256-verified files, derives the same thresholds from the same file). The default
    reads nothing: training's thresholds are the version's own thresholds.json, which
    `model_version` names.
    """
    if params.min_precision is None and params.thresholds_file is None:
        return {"kind": "training"}
    data = read_json(join(version_uri(params.home, model_version), THRESHOLDS_FILE))
    return resolve_operating_point(ThresholdSet.from_json(data), params).to_manifest()


@functools.lru_cache(maxsize=2)
def _cached_tagger(key_json: str, thresholds_sha256: str = "") -> Tagger:
    """`thresholds_sha256` only keys the cache (see `tagger_for`)."""
    fields = json.loads(key_json)
    params = TagParams(**fields)
    return load_tagger(params, fields["model"])
