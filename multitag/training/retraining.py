"""The retrain steps as plain functions over a staging folder.

Why a staging folder: each step (train, choose thresholds, register) is its own Prefect task
and may be retried or cached on its own, so steps hand each other *paths*, never learners or
arrays. The folder is local to the worker that trains; only `register_stage` writes to the
(possibly remote) storage root.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multitag import __version__, registry
from multitag.config import ThresholdParams, TrainParams
from multitag.data import contracts
from multitag.errors import RunFailedError
from multitag.hashing import sha256_bytes, sha256_file
from multitag.inference import measure
from multitag.inference.imaging import decode_image
from multitag.inference.sampling import decode_spread
from multitag.registry.layout import CALIBRATION_FILE
from multitag.registry.versions import THRESHOLD_PARAMS_KEY
from multitag.runtime import library_versions
from multitag.storage import write_bytes_atomic
from multitag.training import calibration, checkpoints, lineage, reports
from multitag.training import thresholds as th
from multitag.training.baselines import label_prior_baselines
from multitag.training.thresholds import ThresholdSet

# `multitag.training.learner` is imported inside the steps that train or unpickle: it imports
# fastai and torch at load time (16 s and 1 GB here, against 0.5 s for this module), and the
# flows, `tasks.retrain` and a stage-reuse check import this module without training.

STAGE_MODEL = "model.pkl"
STAGE_TRAIN = "train.json"
STAGE_VALID = "valid_preds.npz"
STAGE_TEST = "test_preds.npz"
STAGE_THRESHOLDS = "thresholds.json"
STAGE_EVALUATION = "evaluation.json"
STAGE_CALIBRATION = CALIBRATION_FILE  # per-label Platt scaling, fitted on validation

log = logging.getLogger(__name__)


class StageIntegrityError(RunFailedError, RuntimeError):
    """A staged file no longer matches the sha256 recorded when it was written."""


def _write_json(path: Path, obj: Any) -> None:
    """Whole or not at all (temp file + rename): a kill never leaves half a stage file."""
    data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8")
    write_bytes_atomic(str(path), data)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)  # numeric arrays only; np.load refuses pickles
    write_bytes_atomic(str(path), buf.getvalue())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_stage_json(stage_dir: str | Path, name: str) -> Any:
    return json.loads((Path(stage_dir) / name).read_text(encoding="utf-8"))


def label_prevalence(table: Any, vocab: list[str]) -> dict[str, Any]:
    """Share of training images carrying each label; tagging compares incoming rates to it."""
    train_rows = table[~table["is_valid"]]
    n = max(len(train_rows), 1)
    counts = dict.fromkeys(vocab, 0)
    for labels in train_rows["labels"]:
        for tok in set(str(labels).split()):
            if tok in counts:
                counts[tok] += 1
    none = sum(1 for labels in train_rows["labels"] if not str(labels).split())
    return {"labels": {k: v / n for k, v in counts.items()}, "none": none / n}


def _read_test_labels(dataset_dir: Path, vocab: list[str]) -> tuple[list[Path], np.ndarray] | None:
    """Held-out labelled test images (the shapes dataset ships them); None when absent."""
    path = dataset_dir / "test_labels.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    index = {label: i for i, label in enumerate(vocab)}
    targets = np.zeros((len(df), len(vocab)), dtype=bool)
    for row, labels in enumerate(df["labels"]):
        for tok in labels.split():
            if tok in index:
                targets[row, index[tok]] = True
    files = [dataset_dir / "test" / f for f in df["fname"]]
    return files, targets


def train_stage(
    dataset_dir: str | Path,
    params: TrainParams,
    stage_dir: str | Path,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    checkpoint_dir: str | None = None,
) -> dict[str, Any]:
    """Train, then save the provisional learner and validation/test predictions to `stage_dir`.

    `checkpoint_dir` (see checkpoints.checkpoint_location): per-epoch checkpoints go there and a
    killed run resumes from them; they are removed once train.json is written.
    """
    from multitag.training import learner

    dataset_dir, stage = Path(dataset_dir), Path(stage_dir)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / STAGE_TRAIN).unlink(missing_ok=True)  # written last: until then, not reusable
    # One parse of train.csv, by the contract's rules (is_valid spellings come from its YAML);
    # the images were already checked by the validate step, so they are not opened again.
    table = contracts.validate_dataset(dataset_dir, check_images=False).table
    result = learner.train(
        dataset_dir, params, on_epoch=on_epoch, table=table, on_progress=on_progress,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    probs, targets = learner.predict_validation(result.learner)
    _save_npz(stage / STAGE_VALID, probs=probs, targets=targets)
    test = _read_test_labels(dataset_dir, result.vocab)
    if test is not None:
        test_probs = learner.predict_files(result.learner, test[0])
        _save_npz(stage / STAGE_TEST, probs=test_probs, targets=test[1])
    learner.export_learner(result.learner, stage / STAGE_MODEL, thresholds=0.5)  # atomic
    summary = {
        "vocab": result.vocab,
        "history": result.history,
        "wall_time_s": result.wall_time_s,
        "device": result.device,
        "n_train": result.n_train,
        "n_valid": result.n_valid,
        "params": params.model_dump(),
        "prevalence": label_prevalence(table, result.vocab),
        "inference": learner.inference_spec(result.learner),
        "has_test_set": test is not None,
        "resumed_at_epoch": result.resumed_at_epoch,
        # What a later run reusing this stage checks before it trusts (and unpickles) it.
        "sha256": {
            name: sha256_file(stage / name)
            for name in (STAGE_MODEL, STAGE_VALID, STAGE_TEST)
            if (stage / name).exists()
        },
    }
    _write_json(stage / STAGE_TRAIN, summary)
    if checkpoint_dir:  # the stage is the result now; a rerun reuses it, not the checkpoints
        checkpoints.clear_checkpoints(checkpoint_dir)
    return summary


def threshold_stage(stage_dir: str | Path, params: ThresholdParams) -> dict[str, Any]:
    """Choose thresholds on validation; judge them (and the best single global one) on test."""
    stage = Path(stage_dir)
    train_info = read_stage_json(stage, STAGE_TRAIN)
    vocab = train_info["vocab"]
    valid = np.load(stage / STAGE_VALID)
    chosen = th.select_thresholds(valid["probs"], valid["targets"], vocab, params)
    _write_json(stage / STAGE_THRESHOLDS, chosen.to_json())
    evaluation: dict[str, Any] = {
        "validation": th.evaluate(
            valid["probs"], valid["targets"], chosen.as_array(), vocab
        ).to_dict(),
        # What guessing scores on the same images: the champion gate's floor.
        "baselines": label_prior_baselines(
            valid["targets"], vocab, train_info["prevalence"]["labels"]
        ),
    }
    if (stage / STAGE_TEST).exists():
        test = np.load(stage / STAGE_TEST)
        evaluation["test"] = th.evaluate(
            test["probs"], test["targets"], chosen.as_array(), vocab
        ).to_dict()
        evaluation["test_global_policy"] = _global_policy_on_test(valid, test, vocab, params)
        evaluation["test_best_global"] = _best_global_on(test["probs"], test["targets"], vocab)
    evaluation["calibration"] = calibration_stage(stage, chosen, params)
    # What "no new data" compares (`registry.find_version_trained_on`): same data, same params.
    evaluation[THRESHOLD_PARAMS_KEY] = params.model_dump(mode="json")
    _write_json(stage / STAGE_EVALUATION, evaluation)
    return {"thresholds": chosen.to_json(), "evaluation": evaluation}


def calibration_stage(stage: Path, chosen: ThresholdSet, params: ThresholdParams) -> dict[str, Any]:
    """Fit per-label calibration on validation, write calibration.json, and return the summary
    for metrics.json with ECE before/after on validation (in-sample) and on test (held out)."""
    valid = np.load(stage / STAGE_VALID)
    cal = calibration.fit(
        valid["probs"], valid["targets"], chosen.vocab, min_positives=params.min_positives
    )
    _write_json(stage / STAGE_CALIBRATION, cal.to_json())
    ece = {"validation": calibration.ece_before_after(cal, valid["probs"], valid["targets"])}
    if (stage / STAGE_TEST).exists():
        test = np.load(stage / STAGE_TEST)
        ece["test"] = calibration.ece_before_after(cal, test["probs"], test["targets"])
    return calibration.summary(cal, chosen.as_array(), ece)


def _global_policy_on_test(
    valid: Any, test: Any, vocab: list[str], params: ThresholdParams
) -> dict[str, Any]:
    """The single global threshold chosen on validation, judged on test: the baseline the
    chosen policy must match or beat on images neither was chosen on."""
    glob = th.select_thresholds(
        valid["probs"], valid["targets"], vocab, params.model_copy(update={"policy": "global"})
    )
    ev = th.evaluate(test["probs"], test["targets"], glob.as_array(), vocab).to_dict()
    return {"threshold": glob.global_threshold, **{k: ev[k] for k in _HEADLINE if k in ev}}


def _best_global_on(probs: np.ndarray, targets: np.ndarray, vocab: list[str]) -> dict[str, Any]:
    """The best single global threshold chosen *on test itself*: an upper bound to compare with."""
    oracle = th.select_thresholds(probs, targets, vocab, ThresholdParams(policy="global"))
    ev = th.evaluate(probs, targets, oracle.as_array(), vocab).to_dict()
    return {"threshold": oracle.global_threshold, **{k: ev[k] for k in _HEADLINE if k in ev}}


_HEADLINE = ("accuracy_multi", "f1_micro", "f1_macro", "mAP", "none_rate")


def register_stage(
    stage_dir: str | Path,
    home: str | None,
    *,
    dataset: dict[str, Any],
    contract_summary: dict[str, Any],
    fastpath_check_images: int = 1000,
    model_name: str | None = None,
) -> str:
    """Finalise the learner with its thresholds and write an immutable registry version.

    `model_name`: the registry model name (version.json and metrics["name"]); default the
    dataset's name, made a valid name (`registry.default_model_name`).

    With `fastpath_check_images` > 0 and the dataset on this worker, the CPU fast path is
    exported and checked on that many validation images (`export_fastpath`) and registered
    with the model; a model that cannot be exported is registered without one (logged and
    recorded in metrics.json), since tagging can still run it in fp32.
    """
    from multitag.training import learner

    stage = Path(stage_dir)
    train_info = read_stage_json(stage, STAGE_TRAIN)
    thresholds = read_stage_json(stage, STAGE_THRESHOLDS)
    evaluation = read_stage_json(stage, STAGE_EVALUATION)
    # The provisional model.pkl may come from an earlier run (a reused stage): what is
    # unpickled is the bytes just checked against the sha256 train_stage recorded.
    learn = learner.load_learner_file(io.BytesIO(_verified_stage_bytes(stage, STAGE_MODEL)))
    final = stage / "final"
    final.mkdir(exist_ok=True)
    ts = ThresholdSet.from_json(thresholds)
    learner.export_learner(learn, final / STAGE_MODEL, thresholds=ts.as_array())
    metrics = {
        "validation": evaluation["validation"],
        "baselines": evaluation.get("baselines"),
        THRESHOLD_PARAMS_KEY: evaluation.get(THRESHOLD_PARAMS_KEY),
        "test": evaluation.get("test"),
        "test_global_policy": evaluation.get("test_global_policy"),
        "test_best_global": evaluation.get("test_best_global"),
        "history": train_info["history"],
        "dataset": dataset,
        "contract": contract_summary,
        "params": train_info["params"],
        "device": train_info["device"],
        "n_train": train_info["n_train"],
        "n_valid": train_info["n_valid"],
        "wall_time_s": train_info["wall_time_s"],
        "train_label_prevalence": train_info["prevalence"]["labels"],
        "train_none_rate": train_info["prevalence"]["none"],
        "library_versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "name": model_name or registry.default_model_name(dataset.get("name")),
    }
    extra: dict[str, Path] = {}
    dataset_dir = Path(str(dataset.get("local_path") or ""))
    metrics[lineage.LINEAGE_KEY] = lineage.build_lineage(
        dataset_dir if dataset.get("local_path") else None,
        contract_summary,
        n_train=train_info["n_train"],
        n_valid=train_info["n_valid"],
        dataset_sha256=dataset.get("content_sha256"),
    )
    if fastpath_check_images > 0 and (dataset_dir / "train.csv").is_file():
        try:
            extra, metrics["fastpath"] = export_fastpath(
                learn, final, dataset_dir, ts, train_info["inference"], fastpath_check_images
            )
        except Exception as exc:  # any exporter failure: recorded, the model registers without
            log.warning("no fast path for this model (tagging will check one): %s", exc)
            metrics["fastpath"] = {"error": f"{type(exc).__name__}: {exc}"}
    if evaluation.get("calibration") and (stage / STAGE_CALIBRATION).is_file():
        metrics["calibration"] = evaluation["calibration"]
        extra = {**extra, CALIBRATION_FILE: stage / STAGE_CALIBRATION}
    report_files = reports.build_model_report(metrics, thresholds, evaluation["validation"])
    return registry.register_model(
        home,
        learner_file=final / STAGE_MODEL,
        thresholds=thresholds,
        metrics=metrics,
        inference=train_info["inference"],
        report_files=report_files,
        extra_files=extra,
        name=metrics["name"],
    )


def export_fastpath(
    learner: Any,
    final: Path,
    dataset_dir: Path,
    thresholds: Any,
    inference: dict[str, Any],
    n_check: int,
    n_calibration: int = 64,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """ONNX fp32/int8 of the final model, checked on validation images against fp32.

    Calibration images come from the training split, check images from the validation split,
    spread evenly over each, decoded exactly as tagging decodes. Returns the files for the
    registry and a summary for metrics.json.
    """
    table = contracts.validate_dataset(dataset_dir, check_images=False).table
    valid = list(table.loc[table["is_valid"], "fname"])
    train = list(table.loc[~table["is_valid"], "fname"])
    check = _decode_spread(dataset_dir / "train", valid, n_check, inference)
    calibration = _decode_spread(dataset_dir / "train", train, n_calibration, inference)
    out = final / "fastpath"
    record = measure.build_for_registry(
        learner.model, out, mean=inference["mean"], std=inference["std"],
        img_size=int(inference["img_size"]), thresholds=thresholds,
        model_sha256=sha256_bytes((final / STAGE_MODEL).read_bytes()),
        calibration=calibration, check=check,
    )  # fmt: skip
    summary = {
        "chosen": record.chosen,
        "reason": record.reason,
        "n_check": record.n_check,
        "n_labels": record.n_labels,
        "agreement": {k: c.agreement for k, c in record.candidates.items()},
        "images_per_s": {k: round(c.images_per_s, 1) for k, c in record.candidates.items()},
        "build_s": record.build_s,
    }
    return measure.registry_files(out), summary


def _decode_spread(folder: Path, names: list[str], n: int, inference: dict[str, Any]) -> np.ndarray:
    """Up to n images of `names`, evenly spread, as the tagger decodes them (unreadable skipped)."""
    decode = functools.partial(
        decode_image,
        target_size=int(inference["img_size"]),
        resize_method=inference.get("resize_method", "crop"),
        pad_mode=inference.get("pad_mode", "reflection"),
    )
    return decode_spread([str(folder / name) for name in names], n, decode)


def stage_key(dataset_dir: str | Path, params: TrainParams) -> str:
    """Same dataset content + same parameters -> same key, so a rerun reuses finished training.

    The dataset part hashes train.csv and the sizes of the listed images: cheap, and it changes
    when labels, splits or images change.
    """
    root = Path(dataset_dir)
    h = hashlib.sha256()
    h.update((root / "train.csv").read_bytes())
    for p in sorted((root / "train").iterdir()):
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    h.update(params.model_dump_json().encode())
    h.update(__version__.encode())
    return h.hexdigest()[:20]


def stage_problem(stage_dir: str | Path) -> str | None:
    """Why a finished-looking stage cannot be reused (None: it can).

    Why hash: a reused stage's model.pkl is unpickled by `register_stage`, and the staging
    folder is plain local disk; a file changed since train_stage recorded its sha256 (or a
    stage from before sha256s were recorded) is trained again rather than trusted.
    """
    stage = Path(stage_dir)
    if missing := [n for n in (STAGE_MODEL, STAGE_TRAIN, STAGE_VALID) if not (stage / n).exists()]:
        return f"unfinished ({', '.join(missing)} missing)"
    try:
        for name in read_stage_json(stage, STAGE_TRAIN).get("sha256") or {STAGE_MODEL: None}:
            _verified_stage_bytes(stage, name)
    except (StageIntegrityError, ValueError, OSError, AttributeError) as exc:
        return str(exc)
    return None


def stage_complete(stage_dir: str | Path) -> bool:
    return stage_problem(stage_dir) is None


def _verified_stage_bytes(stage: Path, name: str) -> bytes:
    """A staged file's bytes, read once and checked against train.json's sha256 for it."""
    expected = (read_stage_json(stage, STAGE_TRAIN).get("sha256") or {}).get(name)
    if not expected:
        raise StageIntegrityError(
            f"{stage / STAGE_TRAIN} records no sha256 for {name}; the stage cannot be trusted"
        )
    data = (stage / name).read_bytes()
    actual = sha256_bytes(data)
    if actual != expected:
        raise StageIntegrityError(
            f"staged {name} in {stage} has sha256 {actual}, but train.json recorded {expected}: "
            "it changed after training, so it is not used"
        )
    return data


def staging_root() -> Path:
    """Local scratch for training artifacts before they reach the (maybe remote) registry."""
    if os.environ.get("MULTITAG_STAGING"):
        return Path(os.environ["MULTITAG_STAGING"])
    cache = os.environ.get("MULTITAG_CACHE_DIR") or str(Path.home() / ".cache" / "multitag")
    return Path(cache) / "staging"
