"""Writing a new immutable version, and listing and showing the versions there are.

Why register writes every file exclusively and SHA256SUMS last: a racing register of the same
id loses on its first file, and a register killed halfway leaves a version without
SHA256SUMS, which every reader refuses (`IncompleteVersionError`) rather than trusts.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multitag.hashing import sha256_bytes
from multitag.registry.champion import champions, list_decisions
from multitag.registry.errors import IntegrityError, RegistryError, VersionExistsError
from multitag.registry.integrity import format_sums, list_names, parse_sums, read_sums
from multitag.registry.layout import (
    FILE_NAME_RE,
    INFERENCE_FILE,
    METRICS_FILE,
    MODEL_FILE,
    REGISTRY_OWNED,
    REPORT_FILE,
    SUMS_FILE,
    THRESHOLDS_FILE,
    VERSION_FILE,
    VERSION_RE,
    check_version_id,
    iso_time,
    json_bytes,
    loads_json,
    models_uri,
    new_version_id,
    utc_now,
    version_uri,
)
from multitag.registry.naming import NAME_KEY, check_model_name, name_of
from multitag.storage import exists, fs_and_path, join, read_bytes, write_bytes_atomic
from multitag.training import calibration
from multitag.training.lineage import dataset_sha256_of
from multitag.training.reports import build_model_report
from multitag.training.thresholds import ThresholdSet


def register_model(
    home: str | None,
    *,
    learner_file: Path,
    thresholds: dict[str, Any],
    metrics: dict[str, Any],
    inference: dict[str, Any],
    report_files: dict[str, bytes] | None = None,
    version: str | None = None,
    extra_files: Mapping[str, Path] | None = None,
    name: str | None = None,
) -> str:
    """Write a new immutable version and return its id.

    `name`: the model name the version belongs to (its champion is judged among that name's
    versions only), recorded in version.json; default metrics["name"], else the dataset's
    name (`multitag.registry.naming`).

    metrics.json (a dict the caller builds; only "validation" is required):
      validation        `Evaluation.to_dict()` on the validation split with the selected
                        thresholds; the promotion gate reads validation[<metric>] (higher is
                        better), the report reads its headline values and per_label
      test              optional, the same on held-out test images
      dataset           e.g. {"uri", "name", "n_train", "n_valid", "vocab"}
      contract          `ContractReport.summary()`
      params            e.g. {"train": TrainParams dump, "thresholds": ThresholdParams dump}
      library_versions  `multitag.runtime.library_versions()`
      wall_time_s, device, history   training figures

    `report_files=None` builds the report from metrics, thresholds and metrics["validation"];
    pass `{}` for no report. `extra_files`: name -> local file copied into the version (the
    fast path's ONNX files and fastpath.json), covered by SHA256SUMS like every other file.
    Nothing is written over: an existing version id, even a partly written one, raises
    VersionExistsError.
    """
    learner_file = Path(learner_file)
    if not learner_file.is_file():
        raise RegistryError(
            f"learner file {learner_file} does not exist (export the learner first)"
        )
    model_bytes = learner_file.read_bytes()
    if not model_bytes:
        raise RegistryError(f"learner file {learner_file} is empty; export the learner again")
    model_sha = sha256_bytes(model_bytes)
    created = utc_now()
    version = new_version_id(model_sha, created) if version is None else version
    check_version_id(version)
    _check_model_inputs(thresholds, metrics, inference)
    name = _model_name(name, metrics)
    if report_files is None:
        report_files = build_model_report(metrics, thresholds, metrics["validation"])
    _check_report_names(report_files)
    extra = {name: Path(path).read_bytes() for name, path in (extra_files or {}).items()}
    _check_report_names(extra)
    if clash := sorted(set(extra) & set(report_files)):
        raise RegistryError(f"extra files {clash} clash with report files of the same name")

    record = {
        "version": version,
        "created_at": iso_time(created),
        "model_sha256": model_sha,
        "model_bytes": len(model_bytes),
        "source_file": learner_file.name,
        NAME_KEY: name,
    }
    files = {
        VERSION_FILE: json_bytes(record),
        THRESHOLDS_FILE: json_bytes(thresholds),
        METRICS_FILE: json_bytes(metrics),
        INFERENCE_FILE: json_bytes(inference),
        **report_files,
        **extra,
    }
    vdir = version_uri(home, version)
    if exists(vdir):
        raise VersionExistsError(_exists_message(version, vdir))
    try:
        # model.pkl first: its exclusive create claims the version id against a racing register.
        write_bytes_atomic(join(vdir, MODEL_FILE), model_bytes, exclusive=True)
        for name, data in files.items():
            write_bytes_atomic(join(vdir, name), data, exclusive=True)
    except FileExistsError as exc:
        raise VersionExistsError(_exists_message(version, vdir)) from exc
    sums = {MODEL_FILE: model_sha, **{name: sha256_bytes(data) for name, data in files.items()}}
    write_bytes_atomic(join(vdir, SUMS_FILE), format_sums(sums), exclusive=True)
    return version


def _model_name(name: str | None, metrics: Mapping[str, Any]) -> str:
    """The version's name: `name`, which must agree with metrics["name"] when both are given."""
    recorded = metrics.get(NAME_KEY) if isinstance(metrics, Mapping) else None
    if name is None:
        return check_model_name(recorded) if recorded is not None else name_of(None, metrics)
    if recorded is not None and recorded != name:
        raise RegistryError(f"model name {name!r} differs from metrics['name'] {recorded!r}")
    return check_model_name(name)


def _exists_message(version: str, vdir: str) -> str:
    return (
        f"model version {version} already exists at {vdir}; versions are immutable. Register "
        "under another version id (or leave it out to get a fresh one)."
    )


def _check_model_inputs(thresholds: Any, metrics: Any, inference: Any) -> None:
    for name, value in (("thresholds", thresholds), ("metrics", metrics), ("inference", inference)):
        if not isinstance(value, dict):
            raise RegistryError(f"{name} must be a dict, got {type(value).__name__}")
    if not isinstance(metrics.get("validation"), dict):
        raise RegistryError(
            "metrics['validation'] must be the validation Evaluation.to_dict(): the promotion "
            "gate compares metrics['validation'][<metric>]"
        )
    try:
        ThresholdSet.from_json(thresholds)
    except Exception as exc:  # any parse failure means tagging could not use this model
        raise RegistryError(f"thresholds do not load as a ThresholdSet: {exc!r}") from exc
    t_vocab, i_vocab = thresholds.get("vocab"), inference.get("vocab")
    if t_vocab is not None and i_vocab is not None and list(t_vocab) != list(i_vocab):
        raise RegistryError(
            f"thresholds vocab {list(t_vocab)} differs from the model's vocab {list(i_vocab)}: "
            "thresholds must be selected on this model's predictions, in its label order"
        )


def _check_report_names(report_files: Mapping[str, bytes]) -> None:
    for name, data in report_files.items():
        if not FILE_NAME_RE.match(name) or name in REGISTRY_OWNED:
            raise RegistryError(
                f"report file name {name!r} is not allowed: plain names only, not one of "
                f"{sorted(REGISTRY_OWNED)}"
            )
        if not isinstance(data, bytes | bytearray):
            raise RegistryError(f"report file {name!r} must be bytes, got {type(data).__name__}")


def list_versions(home: str | None) -> list[dict[str, Any]]:
    """Every version folder, oldest first, without hashing (that is `verify_version`'s job).

    Each entry: version, name (the model name; see `multitag.registry.naming` for versions
    from before names), created (UTC ISO time), complete (SHA256SUMS present), is_champion
    (of its name), metrics (numeric headline values of metrics["validation"]), dataset_sha256
    (the lineage hash of the data it was trained on, or None), problem (why
    it cannot be used as is, or None), uri.
    """
    root = models_uri(home)
    fs, path = fs_and_path(root)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    champion_versions = {str(r["version"]) for r in champions(home).values()}
    out = []
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry.get("type") != "directory" or name.startswith("_") or not VERSION_RE.match(name):
            continue
        out.append(_version_summary(join(root, name), name, champion_versions))
    return sorted(out, key=lambda v: (v["created"] or "", v["version"]))


def _version_summary(vdir: str, version: str, champion_versions: set[str]) -> dict[str, Any]:
    present = list_names(vdir, version)
    problem = _sums_problem(vdir, version, present)
    created, headline, record, metrics = None, {}, None, None
    try:
        if VERSION_FILE in present:
            record = loads_json(read_bytes(join(vdir, VERSION_FILE)), VERSION_FILE)
            created = record["created_at"]
        if METRICS_FILE in present:
            metrics = loads_json(read_bytes(join(vdir, METRICS_FILE)), METRICS_FILE)
            headline = _headline(metrics.get("validation") or {})
    except (RegistryError, KeyError, TypeError, AttributeError) as exc:
        problem = problem or f"unreadable metadata: {exc!r}"
    return {
        "version": version,
        "name": name_of(record, metrics),
        "created": created,
        "complete": SUMS_FILE in present,
        "is_champion": version in champion_versions,
        "metrics": headline,
        # What `find_version_trained_on` matches first, so it reads no other version's file.
        "dataset_sha256": dataset_sha256_of(metrics) if isinstance(metrics, dict) else None,
        "problem": problem,
        "uri": vdir,
    }


def _sums_problem(vdir: str, version: str, present: Mapping[str, int]) -> str | None:
    """Why SHA256SUMS cannot vouch for this version (None when it can, pending hashing)."""
    try:
        read_sums(vdir, version, present)
    except IntegrityError as exc:
        return str(exc)
    return None


def _headline(evaluation: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in evaluation.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def show_version(home: str | None, version: str) -> dict[str, Any]:
    """Everything a person wants to see about one version (no hashing; see verify_version)."""
    vdir = version_uri(home, version)
    present = list_names(vdir, version)
    problem = _sums_problem(vdir, version, present)
    sums = _listed_sums(vdir) if SUMS_FILE in present else {}

    def load(name: str) -> Any:
        return (
            loads_json(read_bytes(join(vdir, name)), f"{version}/{name}")
            if name in present
            else None
        )

    thresholds = load(THRESHOLDS_FILE)
    record = load(VERSION_FILE) or {}
    metrics = load(METRICS_FILE)
    name = name_of(record, metrics)
    champion = champions(home).get(name)
    return {
        "version": version,
        "name": name,
        "uri": vdir,
        "complete": SUMS_FILE in present,
        "problem": problem,
        "is_champion": bool(champion and champion["version"] == version),
        "created": record.get("created_at"),
        "model_sha256": record.get("model_sha256"),
        "files": [
            {"name": n, "size": s, "sha256": sums.get(n)} for n, s in sorted(present.items())
        ],
        "metrics": metrics,
        # dataset content hash, rows per split, contract and code versions (None: older)
        "lineage": (metrics or {}).get("lineage"),
        # what guessing scores on validation, the champion gate's floor (None: older version)
        "baselines": (metrics or {}).get("baselines"),
        # ECE before/after calibration per split (None: older version, raw scores)
        "calibration": calibration.brief((metrics or {}).get("calibration")),
        # curves are long arrays: the plots in report.md show them
        "thresholds": {k: v for k, v in (thresholds or {}).items() if k != "curves"},
        "inference": load(INFERENCE_FILE),
        "report_md": _text(vdir, REPORT_FILE) if REPORT_FILE in present else None,
        "decisions": list_decisions(home, version),
    }


def _text(vdir: str, name: str) -> str:
    return read_bytes(join(vdir, name)).decode("utf-8", errors="replace")


def _listed_sums(vdir: str) -> dict[str, str]:
    """What SHA256SUMS says, for display; a malformed file shows as none (see `problem`)."""
    try:
        return parse_sums(read_bytes(join(vdir, SUMS_FILE)))
    except IntegrityError:
        return {}


THRESHOLD_PARAMS_KEY = "threshold_params"  # metrics.json: the ThresholdParams a version used


def find_version_trained_on(
    home: str | None,
    dataset_sha256: str,
    *,
    train_params: Mapping[str, Any],
    threshold_params: Mapping[str, Any],
    name: str | None = None,
) -> str | None:
    """The newest complete version trained on exactly this data with exactly these parameters.

    Why: a scheduled retrain on unchanged data would spend a training run to register the
    same model again (and the gate would keep the champion anyway); the retrain flow reuses
    this version instead and says "no new data". A match has the lineage dataset hash (the
    bytes trained on), metrics["params"] (TrainParams) and metrics["threshold_params"]
    (ThresholdParams) equal as JSON, and the model name `name` where the version has one.
    Incomplete or damaged versions, and versions that recorded no threshold params, never
    match: training again is the safe answer.
    """
    want_train, want_thresholds = _as_json(train_params), _as_json(threshold_params)
    for entry in reversed(list_versions(home)):
        if not entry["complete"] or entry["problem"]:
            continue
        if name is not None and entry.get(NAME_KEY) not in (None, name):
            continue
        if entry.get("dataset_sha256") != dataset_sha256:  # list_versions read it already
            continue
        try:
            metrics = loads_json(read_bytes(join(entry["uri"], METRICS_FILE)), METRICS_FILE)
        except (RegistryError, OSError):
            continue
        if (
            isinstance(metrics, dict)
            and _as_json(metrics.get("params")) == want_train
            and _as_json(metrics.get(THRESHOLD_PARAMS_KEY)) == want_thresholds
        ):
            return str(entry["version"])
    return None


def _as_json(value: Any) -> Any:
    """A parameter dump as JSON reads it back (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
