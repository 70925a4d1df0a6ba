"""Building a fast-path record: export every candidate, score it against torch fp32, time it.

Why a module of its own: this is the one expensive step (export, quantise, compile, score the
check set with each candidate), run at registration (`build_for_registry`, called by
multitag.training.retraining) or, for versions registered without a record, on first use of
a model file on a machine (`build_record`, the cached variant). Tagging runs only read what
it wrote (multitag.inference.selection).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from multitag.hashing import sha256_file
from multitag.inference import cpu
from multitag.inference.agreement import choose, decision_agreement
from multitag.inference.aoti import compile_bf16
from multitag.inference.arrays import normalise_batch
from multitag.inference.onnx_export import export_onnx, quantize_int8
from multitag.inference.records import (
    AOTI_BF16,
    AOTI_PACKAGE,
    DEFAULT_AGREEMENT_BAR,
    FP32_ONNX,
    INT8_ONNX,
    ORT_FP32,
    ORT_INT8,
    RECORD_FILE,
    RECORD_LIBRARIES,
    TORCH_BF16,
    TORCH_FP32,
    TORCH_PROGRAM,
    CandidateResult,
    FastPathError,
    FastPathRecord,
    record_dir,
)
from multitag.inference.scorers import Scorer, file_scorer
from multitag.inference.torch_scorer import TorchScorer, bf16_scorer, export_program, n_labels_of
from multitag.runtime import library_versions
from multitag.storage import publish_folder

log = logging.getLogger(__name__)

CHECK_BATCH = 64  # the tagger's default batch size


def _timed_scores(
    scorer: Scorer, images: np.ndarray, batch: int = CHECK_BATCH
) -> tuple[np.ndarray, float]:
    """Scores of all images in `batch`-sized batches, and images/s on full batches.

    Timed at the batch size the tagger will use: measured here, bf16 on resnet50 ran 54 img/s
    at batch 32 and 26 at batch 64, so a ranking at another size can pick the slower path.
    The speed comes from at least two full batches after a warm-up one (check images tiled
    when there are fewer), so a small check set still ranks the candidates at that size.
    """
    out = np.concatenate(
        [scorer.score_batch(images[i : i + batch]) for i in range(0, len(images), batch)]
    )
    full = images[np.arange(2 * batch) % len(images)]
    scorer.score_batch(full[:batch])  # warm-up: allocation, kernel choice
    t0 = time.perf_counter()
    for i in range(0, len(full), batch):
        scorer.score_batch(full[i : i + batch])
    dt = time.perf_counter() - t0
    return out, len(full) / dt if dt > 0 else float("inf")


def measure_candidates(
    model: Any,
    folder: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    calibration: np.ndarray,
    check: np.ndarray,
    threads: int | None = None,
    batch_size: int = CHECK_BATCH,
    torch_program: bool = False,
) -> tuple[dict[str, CandidateResult], int]:
    """Export and quantise into `folder`, then score every candidate against torch fp32.

    `calibration` and `check`: uint8 (N, H, W, 3) model-ready images, disjoint. Returns the
    results by candidate name and the model's label count. `torch_program`: also save the
    bf16 candidate as a `torch.export` program (for the registry: no unpickling to run it).
    """
    if len(check) == 0 or len(calibration) == 0:
        raise FastPathError("a fast path needs calibration and check images; got none")
    n_labels = n_labels_of(model, img_size)
    ref = TorchScorer(model, mean=mean, std=std, n_labels=n_labels)
    ref_probs, ref_speed = _timed_scores(ref, check, batch_size)
    results = {TORCH_FP32: CandidateResult(TORCH_FP32, 1.0, ref_speed, 0.0, 0)}
    export_onnx(model, folder / FP32_ONNX, img_size)
    quantize_int8(folder / FP32_ONNX, folder / INT8_ONNX, normalise_batch(calibration, mean, std))
    files = {ORT_FP32: FP32_ONNX, ORT_INT8: INT8_ONNX}
    requires: dict[str, list[str]] = {}
    scorers: dict[str, Callable[[], Scorer]] = {}
    if cpu.bf16_supported():
        scorers[TORCH_BF16] = lambda: bf16_scorer(model, mean, std, n_labels)
        if torch_program:
            try:  # then checked as it will run: the saved program, loaded back
                export_program(model, folder / TORCH_PROGRAM, img_size)
                files[TORCH_BF16] = TORCH_PROGRAM
            except Exception as exc:  # an architecture torch.export cannot capture
                log.warning("no torch program for bf16 (%s): a bf16 run will unpickle", exc)
            try:
                requires[AOTI_BF16] = compile_bf16(model, folder / AOTI_PACKAGE, img_size,
                                                   mean, std)  # fmt: skip
                files[AOTI_BF16] = AOTI_PACKAGE
            except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...
                log.warning("no compiled bf16 candidate (%s: %s)", type(exc).__name__, exc)
    for name, file in files.items():  # partial binds this name and file, not the last ones
        scorers[name] = partial(
            file_scorer, name, folder / file, mean=mean, std=std, n_labels=n_labels, threads=threads
        )
    for name, make in scorers.items():
        probs, speed = _timed_scores(make(), check, batch_size)
        agree = decision_agreement(ref_probs, probs, thresholds)
        n = round((1.0 - agree) * ref_probs.size)
        f = files.get(name)
        results[name] = CandidateResult(
            name, agree, speed, float(np.max(np.abs(probs - ref_probs))), n, f,
            sha256_file(folder / f) if f else None, requires.get(name),
        )  # fmt: skip
    return results, n_labels


def _record(
    results: dict[str, CandidateResult],
    *,
    model_sha256: str,
    n_labels: int,
    bar: float,
    n_calibration: int,
    n_check: int,
    t_start: float,
    extra: dict[str, Any],
) -> FastPathRecord:
    chosen, reason = choose(results, bar)
    return FastPathRecord(
        model_sha256=model_sha256,
        versions=library_versions(RECORD_LIBRARIES, loaded=True),
        created_at=datetime.now(UTC).isoformat(),
        bar=bar,
        n_calibration=n_calibration,
        n_check=n_check,
        n_labels=n_labels,
        candidates=results,
        chosen=chosen,
        reason=reason,
        build_s=round(time.perf_counter() - t_start, 2),
        extra=extra,
    )


def build_record(
    model: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    model_sha256: str,
    calibration: np.ndarray,
    check: np.ndarray,
    bar: float = DEFAULT_AGREEMENT_BAR,
    root: Path | None = None,
    threads: int | None = None,
    batch_size: int = CHECK_BATCH,
) -> FastPathRecord:
    """Export, quantise, measure every candidate against torch fp32, write the cache record.

    For models registered without an export-time record (see `build_for_registry`):
    `calibration` and `check` come from the images the model is about to tag.
    """
    if len(check) == 0 or len(calibration) == 0:
        raise FastPathError("a fast path needs calibration and check images; got none")
    folder = record_dir(model_sha256, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        record = build_for_registry(
            model, tmp, mean=mean, std=std, img_size=img_size, thresholds=thresholds,
            model_sha256=model_sha256, calibration=calibration, check=check, bar=bar,
            batch_size=batch_size, threads=threads, sets=("images to tag", "images to tag"),
            torch_program=False,
        )  # fmt: skip
        publish_folder(tmp, folder)  # a concurrent builder may win: fine
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def build_for_registry(
    model: Any,
    out_dir: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    model_sha256: str,
    calibration: np.ndarray,
    check: np.ndarray,
    bar: float = DEFAULT_AGREEMENT_BAR,
    batch_size: int = CHECK_BATCH,
    threads: int | None = None,
    sets: tuple[str, str] = ("validation", "training"),
    torch_program: bool = True,
) -> FastPathRecord:
    """The export-time fast path: ONNX files and fastpath.json in `out_dir`, for the registry.

    Why at export: the validation set is labelled, large and already there, so the agreement
    behind `precision=auto` is measured once on many images (a 0.5% bar needs thousands of
    decisions) instead of on a small sample in every tagging run; the record, the ONNX files
    and their sha256 then travel with the model version, and a tagging run that uses an ONNX
    candidate never unpickles the learner. `calibration`: training images; `check`:
    validation images (uint8, model-ready, disjoint); `sets` names them in the record.
    `build_record` reuses it for the tag-time check (no torch program: that path has the
    learner).
    """
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    results, n_labels = measure_candidates(
        model, out_dir, mean=mean, std=std, img_size=img_size, thresholds=thresholds,
        calibration=calibration, check=check, threads=threads, batch_size=batch_size,
        torch_program=torch_program,
    )  # fmt: skip
    record = _record(
        results, model_sha256=model_sha256, n_labels=n_labels, bar=bar,
        n_calibration=len(calibration), n_check=len(check), t_start=t_start,
        extra={"batch_size": batch_size, "check_set": sets[0], "calibration_set": sets[1]},
    )  # fmt: skip
    (out_dir / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=2))
    log.info("fast path for model %s (checked on %s images): %s", model_sha256[:12], sets[0],
             record.reason)  # fmt: skip
    return record


def registry_files(out_dir: Path) -> dict[str, Path]:
    """The files of `build_for_registry` by name, as `registry.register_model(extra_files=)`."""
    names = (RECORD_FILE, FP32_ONNX, INT8_ONNX, TORCH_PROGRAM, AOTI_PACKAGE)
    return {name: out_dir / name for name in names if (out_dir / name).is_file()}
