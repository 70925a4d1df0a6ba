"""Versioned models on any fsspec root, with sha256 integrity and a champion pointer.

Layout under `<home>/models/` (home: a local folder, `memory://...`, `s3://bucket/prefix`):

    <version>/model.pkl        exported fastai learner; a pickle, so never loaded unverified
    <version>/version.json     registry metadata: version, created_at, model sha256 and size
    <version>/thresholds.json  `ThresholdSet.to_json()`
    <version>/metrics.json     see `register_model`; the gate reads metrics["validation"][metric]
    <version>/inference.json   `training.inference_spec()`: img_size, mean, std, vocab, arch
    <version>/report.md, *.png `reports.build_model_report()` output
    <version>/fastpath.json,   optional: the CPU fast path exported at registration and its
      model.{fp32,int8}.onnx,  agreement with fp32 on validation (multitag.inference.fastpath);
      model.pt2                model.pt2 is the torch.export program a bf16 run uses
    <version>/SHA256SUMS       `<hex>  <name>` per file (sha256sum format), written LAST: its
                               presence is what marks a version complete
    champion.json              the readable champion pointer: a copy of the newest
                               generation record below (tagging and `models list` read it)
    _champion/gen-<n>.json     the promotion chain: generation n's record (version, sha256,
                               metric, value, previous, the decision), created exclusively
    _decisions/<version>/<time>-<id>.json   decisions that did NOT promote (the promoted ones
                               are the chain records; `list_decisions` shows both)

Why decisions live outside the version folder: a version is immutable once written (SHA256SUMS
covers every file in it, and an unlisted file fails verification), while one version can be
judged many times.

Concurrency: registering is safe against a concurrent register of the same version id (every
file is an exclusive create). Promotion is a compare-and-swap on the chain: a promoter reads
the newest generation n, judges its candidate against that champion, and claims generation
n+1 with an exclusive create (`O_EXCL`-style link locally, `If-None-Match: *` on S3). Of two
promoters that read the same n, exactly one creates n+1; the other re-reads the chain and
judges again against the new champion, so the better model ends up champion and a decision
is recorded as promoted only when its swap won. Why a chain of exclusive creates and not an
ETag `If-Match` on champion.json: exclusive create is the one conditional write that both the
local disk and every S3 store this project supports already honour (and that the run-start
probe checks), whereas If-Match has no local-disk equivalent and S3-compatible stores vary;
one code path for both keeps the two from drifting, and the chain doubles as an audit trail.
champion.json is written after the chain step and re-pointed by whoever notices it is behind,
so readers that see a stale pointer (a promoter killed in between) are corrected by the
chain: `get_champion` follows generations past the pointer.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import posixpath
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from multitag.config import get_settings
from multitag.storage import (
    exists,
    fs_and_path,
    is_local,
    join,
    read_bytes,
    unstrip,
    write_bytes_atomic,
    write_json_atomic,
)

MODEL_FILE = "model.pkl"
VERSION_FILE = "version.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
INFERENCE_FILE = "inference.json"
REPORT_FILE = "report.md"
SUMS_FILE = "SHA256SUMS"
FASTPATH_FILE = "fastpath.json"  # multitag.inference.fastpath's export-time record (optional)
# Large binaries are hashed when they are opened (`verified_file`), not read into memory by
# `load_metadata`.
_LAZY_SUFFIXES = (".onnx", ".pt2")
CHAMPION_FILE = "champion.json"
CHAIN_DIR = "_champion"
DECISIONS_DIR = "_decisions"
_GEN_RE = re.compile(r"^gen-(\d{9,})\.json$")

REQUIRED_FILES = (MODEL_FILE, VERSION_FILE, THRESHOLDS_FILE, METRICS_FILE, INFERENCE_FILE)
_REGISTRY_OWNED = frozenset({*REQUIRED_FILES, SUMS_FILE})
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SUMS_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_CHUNK = 1 << 20
_LIBRARIES = (
    "multitag",
    "torch",
    "torchvision",
    "fastai",
    "fastcore",
    "timm",
    "numpy",
    "pandas",
    "pillow",
    "scikit-learn",
    "fsspec",
    "s3fs",
    "pyarrow",
    "prefect",
)


class RegistryError(Exception):
    """A registry operation cannot go ahead (bad input, missing version, bad metrics)."""


class IntegrityError(RegistryError):
    """A stored file does not match its recorded sha256, or the version cannot be verified."""


class IncompleteVersionError(IntegrityError):
    """The version has no SHA256SUMS: its registration never finished, so nothing is trusted."""


class VersionNotFoundError(RegistryError):
    """No folder for this version under <home>/models/."""


class VersionExistsError(RegistryError):
    """Versions are immutable: a register may not write into an existing version folder."""


class NoChampionError(RegistryError):
    """No champion.json yet: nothing to load by default."""


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of the gate, with both numbers, as recorded in models/_decisions/."""

    promoted: bool
    reason: str
    version: str
    metric: str
    candidate_value: float | None
    champion_value: float | None
    champion_version: str | None
    forced: bool
    decided_at: str
    # The chain generation this promotion created (None when not promoted), and how many
    # times its compare-and-swap lost to a concurrent promotion before this decision.
    generation: int | None = None
    lost_swaps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelMetadata:
    """A verified version's JSON files and model file, with nothing unpickled.

    Why: a tagger whose verified ONNX fast path is cached (keyed by `sha256`) needs only the
    thresholds and the input spec; unpickling the learner means importing fastai (seconds).
    """

    version: str
    thresholds: Any  # multitag.training.thresholds.ThresholdSet
    metrics: dict[str, Any]
    inference: dict[str, Any]
    sha256: str  # of model.pkl, checked against SHA256SUMS (and champion.json if the champion)
    model_path: Path  # the local, sha-checked model.pkl (a cache copy for remote roots)
    uri: str = ""  # the version folder
    sums: dict[str, str] = field(default_factory=dict)  # SHA256SUMS: every file of the version
    fastpath: dict[str, Any] | None = None  # fastpath.json, when the version was exported with one
    home: str | None = None


@dataclass
class LoadedModel:
    """A verified, unpickled model with everything needed to use it."""

    version: str
    learner: Any
    thresholds: Any  # multitag.training.thresholds.ThresholdSet (imported lazily)
    metrics: dict[str, Any]
    inference: dict[str, Any]
    sha256: str
    model_path: Path  # the local file that was unpickled (a verified cache copy for remote roots)


# ---------------------------------------------------------------------------------- paths


def models_uri(home: str | None) -> str:
    return get_settings(home).models


def version_uri(home: str | None, version: str) -> str:
    _check_version_id(version)
    return join(models_uri(home), version)


def _check_version_id(version: str) -> None:
    # Version ids become folder names and cache paths: keep them plain and traversal-free.
    if not isinstance(version, str) or not _VERSION_RE.match(version) or ".." in version:
        raise RegistryError(
            f"invalid model version id {version!r}: use letters, digits, '.', '_' and '-' "
            "(at most 100 characters, starting with a letter or digit)"
        )
    if version == CHAMPION_FILE:
        raise RegistryError(f"{version!r} is reserved by the registry; choose another version id")


def new_version_id(model_sha256: str, when: datetime | None = None) -> str:
    """`20261128T123456Z-ab12cd`: sorts by creation time, and names the model bytes it holds."""
    when = (when or datetime.now(UTC)).astimezone(UTC)
    return f"{when:%Y%m%dT%H%M%SZ}-{model_sha256[:6]}"


# ------------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_stream(f: BinaryIO, sink: BinaryIO | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def _sha256_uri(uri: str) -> str:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return _sha256_stream(f)


def format_sums(sums: Mapping[str, str]) -> bytes:
    """sha256sum's text format, so `sha256sum -c SHA256SUMS` works inside a version folder."""
    return "".join(f"{sums[name]}  {name}\n" for name in sorted(sums)).encode("ascii")


def parse_sums(data: bytes, *, where: str = SUMS_FILE) -> dict[str, str]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{where} is not ASCII text: {exc}") from exc
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = _SUMS_LINE_RE.match(line)
        if not match:
            raise IntegrityError(f"{where} line {lineno} is not '<sha256 hex>  <name>': {line!r}")
        digest, name = match.groups()
        if not _FILE_RE.match(name) or name == SUMS_FILE:
            raise IntegrityError(f"{where} line {lineno} names an invalid file {name!r}")
        if name in sums:
            raise IntegrityError(f"{where} lists {name!r} twice")
        sums[name] = digest
    return sums


def _mismatch(version: str, name: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"{name} of model version {version} does not match SHA256SUMS: expected sha256 "
        f"{expected}, found {actual}. The file changed after registration; it was not loaded. "
        "Register the model again as a new version."
    )


def _check_sha(version: str, name: str, data: bytes, expected: str) -> None:
    actual = sha256_bytes(data)
    if actual != expected:
        raise _mismatch(version, name, expected, actual)


# ---------------------------------------------------------------------------------- JSON


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays (no numpy import needed) and paths; anything else is a caller bug.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable: {obj!r}")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8")


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} is not valid JSON: {exc}") from exc


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model, for metrics.json (no heavy imports)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed: simply not part of this model's environment
    return out


# ------------------------------------------------------------------------------ register


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
) -> str:
    """Write a new immutable version and return its id.

    metrics.json (a dict the caller builds; only "validation" is required):
      validation        `Evaluation.to_dict()` on the validation split with the selected
                        thresholds; the promotion gate reads validation[<metric>] (higher is
                        better), the report reads its headline values and per_label
      test              optional, the same on held-out test images
      dataset           e.g. {"uri", "name", "n_train", "n_valid", "vocab"}
      contract          `ContractReport.summary()`
      params            e.g. {"train": TrainParams dump, "thresholds": ThresholdParams dump}
      library_versions  `library_versions()`
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
    created = _now()
    version = new_version_id(model_sha, created) if version is None else version
    _check_version_id(version)
    _check_model_inputs(thresholds, metrics, inference)
    if report_files is None:
        from multitag.training.reports import build_model_report

        report_files = build_model_report(metrics, thresholds, metrics["validation"])
    _check_report_names(report_files)
    extra = {name: Path(path).read_bytes() for name, path in (extra_files or {}).items()}
    _check_report_names(extra)
    if clash := sorted(set(extra) & set(report_files)):
        raise RegistryError(f"extra files {clash} clash with report files of the same name")

    record = {
        "version": version,
        "created_at": _iso(created),
        "model_sha256": model_sha,
        "model_bytes": len(model_bytes),
        "source_file": learner_file.name,
    }
    files = {
        VERSION_FILE: _json_bytes(record),
        THRESHOLDS_FILE: _json_bytes(thresholds),
        METRICS_FILE: _json_bytes(metrics),
        INFERENCE_FILE: _json_bytes(inference),
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
    from multitag.training.thresholds import ThresholdSet

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
        if not _FILE_RE.match(name) or name in _REGISTRY_OWNED:
            raise RegistryError(
                f"report file name {name!r} is not allowed: plain names only, not one of "
                f"{sorted(_REGISTRY_OWNED)}"
            )
        if not isinstance(data, bytes | bytearray):
            raise RegistryError(f"report file {name!r} must be bytes, got {type(data).__name__}")


# -------------------------------------------------------------------------------- verify


def _list_names(vdir: str, version: str) -> dict[str, int]:
    """File names (-> size) directly in a version folder."""
    fs, path = fs_and_path(vdir)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        entries = []
    if not entries:
        raise VersionNotFoundError(
            f"model version {version} not found at {vdir}; `multitag models list` shows versions"
        )
    return {
        posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in entries
        if e.get("type") != "directory"
    }


def _read_sums(vdir: str, version: str, present: Mapping[str, int] | None = None) -> dict[str, str]:
    """SHA256SUMS, checked to cover exactly the files present (no hashing yet)."""
    present = _list_names(vdir, version) if present is None else present
    if SUMS_FILE not in present:
        raise IncompleteVersionError(
            f"model version {version} is incomplete: {vdir} has no {SUMS_FILE}, so its "
            "registration did not finish and its files cannot be trusted. Delete the folder "
            "and register the model again."
        )
    sums = parse_sums(read_bytes(join(vdir, SUMS_FILE)), where=f"{version}/{SUMS_FILE}")
    if missing := [name for name in REQUIRED_FILES if name not in sums]:
        raise IntegrityError(f"{version}/{SUMS_FILE} does not list required files {missing}")
    if absent := sorted(set(sums) - set(present)):
        raise IntegrityError(
            f"model version {version}: files listed in {SUMS_FILE} are missing: {absent}"
        )
    if unlisted := sorted(set(present) - set(sums) - {SUMS_FILE}):
        raise IntegrityError(
            f"model version {version} holds files not in {SUMS_FILE}: {unlisted}; versions are "
            "immutable, so something wrote into it after registration"
        )
    return sums


def _verify(vdir: str, version: str) -> dict[str, str]:
    sums = _read_sums(vdir, version)
    for name in sorted(sums):
        actual = _sha256_uri(join(vdir, name))
        if actual != sums[name]:
            raise _mismatch(version, name, sums[name], actual)
    return sums


def verify_version(home: str | None, version: str) -> None:
    """Hash every file of a version against SHA256SUMS; raise IntegrityError on any mismatch."""
    _verify(version_uri(home, version), version)


def _read_verified(vdir: str, version: str, name: str, sums: Mapping[str, str]) -> bytes:
    data = read_bytes(join(vdir, name))
    _check_sha(version, name, data, sums[name])
    return data


# -------------------------------------------------------------------------------- query


def get_champion(home: str | None) -> dict[str, Any] | None:
    """The current champion's record, or None before the first promotion.

    champion.json is read first; a promotion chain that has moved past it (its writer was
    killed, or is about to re-point it) is followed to the newest generation. A champion.json
    that disagrees with the chain record of its own generation was altered: IntegrityError.
    """
    return _chain_head(home).record


def check_champion_pointer(home: str | None, champion: Mapping[str, Any]) -> dict[str, str]:
    """The champion version's SHA256SUMS, after checking the pointer's model sha256 against it.

    Why a separate step: tagging resolves the champion once and then loads that version by
    its id; without this check a pointer naming other bytes than the version holds would go
    unnoticed on that path. Hashing the files themselves is the loader's job.
    """
    version = str(champion["version"])
    sums = _read_sums(version_uri(home, version), version)
    if champion["sha256"] != sums[MODEL_FILE]:
        raise IntegrityError(
            f"champion.json names {version} with model.pkl sha256 {champion['sha256']}, but its "
            f"{SUMS_FILE} says {sums[MODEL_FILE]}; the pointer does not describe that version, "
            "so it was not used. Run `multitag models promote VERSION` to repair it."
        )
    return sums


@dataclass(frozen=True)
class _Head:
    generation: int  # 0: no chain yet (no champion, or a champion.json from before the chain)
    record: dict[str, Any] | None


def _chain_uri(home: str | None, generation: int) -> str:
    return join(models_uri(home), CHAIN_DIR, f"gen-{generation:09d}.json")


def _read_if_present(uri: str) -> bytes | None:
    # cat_file asks the store every time: s3fs answers exists()/info() from a cached parent
    # listing, which would hide a generation created after that listing.
    fs, path = fs_and_path(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _checked_pointer(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), str) for key in ("version", "sha256")
    ):
        raise RegistryError(
            f"{where} lacks 'version' or 'sha256'; promote a version again to repair it"
        )
    return record


def _read_generation(home: str | None, generation: int) -> dict[str, Any] | None:
    uri = _chain_uri(home, generation)
    data = _read_if_present(uri)
    if data is None:
        return None
    record = _checked_pointer(_loads(data, uri), uri)
    if record.get("generation") != generation:
        raise IntegrityError(f"{uri} records generation {record.get('generation')!r}")
    return record


def _chain_head(home: str | None) -> _Head:
    """The newest generation: champion.json's, then forward while a next one exists."""
    uri = join(models_uri(home), CHAMPION_FILE)
    data = _read_if_present(uri)
    pointer = None if data is None else _checked_pointer(_loads(data, uri), uri)
    generation = int(pointer.get("generation") or 0) if pointer else 0
    record = pointer
    if pointer is not None and generation > 0:
        stored = _read_generation(home, generation)
        if stored is None or stored != pointer:
            raise IntegrityError(
                f"{uri} does not match the promotion record of its generation {generation} "
                f"({_chain_uri(home, generation)}): champion.json was altered after promotion, "
                "so it was not used. Run `multitag models promote VERSION` to repair it."
            )
    while (newer := _read_generation(home, generation + 1)) is not None:
        generation, record = generation + 1, newer
    return _Head(generation, record)


def list_versions(home: str | None) -> list[dict[str, Any]]:
    """Every version folder, oldest first, without hashing (that is `verify_version`'s job).

    Each entry: version, created (UTC ISO time), complete (SHA256SUMS present), is_champion,
    metrics (numeric headline values of metrics["validation"]), problem (why it cannot be
    used as is, or None), uri.
    """
    root = models_uri(home)
    fs, path = fs_and_path(root)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    champion = get_champion(home)
    champion_version = champion["version"] if champion else None
    out = []
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry.get("type") != "directory" or name.startswith("_") or not _VERSION_RE.match(name):
            continue
        out.append(_version_summary(join(root, name), name, champion_version))
    return sorted(out, key=lambda v: (v["created"] or "", v["version"]))


def _version_summary(vdir: str, version: str, champion_version: str | None) -> dict[str, Any]:
    present = _list_names(vdir, version)
    problem = _sums_problem(vdir, version, present)
    created, headline = None, {}
    try:
        if VERSION_FILE in present:
            created = _loads(read_bytes(join(vdir, VERSION_FILE)), VERSION_FILE)["created_at"]
        if METRICS_FILE in present:
            metrics = _loads(read_bytes(join(vdir, METRICS_FILE)), METRICS_FILE)
            headline = _headline(metrics.get("validation") or {})
    except (RegistryError, KeyError, TypeError, AttributeError) as exc:
        problem = problem or f"unreadable metadata: {exc!r}"
    return {
        "version": version,
        "created": created,
        "complete": SUMS_FILE in present,
        "is_champion": version == champion_version,
        "metrics": headline,
        "problem": problem,
        "uri": vdir,
    }


def _sums_problem(vdir: str, version: str, present: Mapping[str, int]) -> str | None:
    """Why SHA256SUMS cannot vouch for this version (None when it can, pending hashing)."""
    try:
        _read_sums(vdir, version, present)
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
    present = _list_names(vdir, version)
    problem = _sums_problem(vdir, version, present)
    sums = _listed_sums(vdir) if SUMS_FILE in present else {}
    champion = get_champion(home)

    def load(name: str) -> Any:
        return (
            _loads(read_bytes(join(vdir, name)), f"{version}/{name}") if name in present else None
        )

    thresholds = load(THRESHOLDS_FILE)
    record = load(VERSION_FILE) or {}
    return {
        "version": version,
        "uri": vdir,
        "complete": SUMS_FILE in present,
        "problem": problem,
        "is_champion": bool(champion and champion["version"] == version),
        "created": record.get("created_at"),
        "model_sha256": record.get("model_sha256"),
        "files": [
            {"name": n, "size": s, "sha256": sums.get(n)} for n, s in sorted(present.items())
        ],
        "metrics": load(METRICS_FILE),
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


def list_decisions(home: str | None, version: str | None = None) -> list[dict[str, Any]]:
    """Recorded promotion decisions (for one version or all), oldest first.

    Promotions come from the chain (each generation's record holds its decision), the rest
    from `_decisions/`: the log of promotions is the chain itself, so it always agrees with
    the pointer, even when a promoter was killed right after its swap.
    """
    if version is not None:
        _check_version_id(version)
    root = join(models_uri(home), DECISIONS_DIR)
    if version is not None:
        root = join(root, version)
    decisions = [_loads(read_bytes(u), u) for u in _json_files(root)]
    for record in _chain_records(home):
        decision = record.get("decision")
        if isinstance(decision, dict) and version in (None, decision.get("version")):
            decisions.append(decision)
    return sorted(decisions, key=lambda d: (d.get("decided_at") or "", d.get("version") or ""))


def _json_files(root: str) -> list[str]:
    fs, path = fs_and_path(root)
    try:
        found = sorted(p for p in fs.find(path) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(path)  # a cached listing must not hide later writes (see above)
    return [unstrip(fs, p) for p in found]


def _chain_records(home: str | None) -> list[dict[str, Any]]:
    """Every generation record, oldest first."""
    found = []
    for uri in _json_files(join(models_uri(home), CHAIN_DIR)):
        match = _GEN_RE.match(posixpath.basename(uri))
        if match:
            found.append((int(match.group(1)), _loads(read_bytes(uri), uri)))
    return [record for _, record in sorted(found, key=lambda item: item[0])]


# ------------------------------------------------------------------------------- promote


def _metric_value(metrics: Any, metric: str, version: str) -> float:
    value = (metrics.get("validation") or {}).get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RegistryError(
            f"model version {version} has no finite validation metric {metric!r} in "
            f"{METRICS_FILE} (found {value!r}); compare on a metric both versions have, or force"
        )
    return float(value)


def promote_if_better(
    home: str | None, version: str, metric: str, force: bool = False
) -> PromotionDecision:
    """The champion gate: promote only if metrics["validation"][metric] strictly beats the
    champion's (higher is better; a tie keeps the champion), or there is no champion, or force.

    The candidate is fully verified first (every sha256); a champion that no longer verifies
    loses to any verified candidate. The judgement and the swap are one compare-and-swap on
    the promotion chain (see the module docstring): a swap lost to a concurrent promotion is
    judged again against the champion that won, so the decision recorded is always against
    the champion the pointer actually moved from. Recorded whether or not it promotes.
    """
    if "loss" in metric.lower():
        raise RegistryError(f"the gate compares higher-is-better metrics; {metric!r} is a loss")
    vdir = version_uri(home, version)
    sums = _verify(vdir, version)
    metrics = _loads(_read_verified(vdir, version, METRICS_FILE, sums), METRICS_FILE)
    try:
        candidate: float | None = _metric_value(metrics, metric, version)
    except RegistryError:
        if not force:
            raise
        candidate = None
    lost = 0
    while True:
        head = _chain_head(home)
        promoted, reason, champ_version, champ_value = _gate(
            home, head.record, version, candidate, metric, force
        )
        decided = _now()
        decision = PromotionDecision(
            promoted, reason, version, metric, candidate, champ_value, champ_version, force,
            _iso(decided), head.generation + 1 if promoted else None, lost,
        )  # fmt: skip
        if not promoted:
            _record_decision(home, decision, decided)
            return decision
        record = {
            "version": version,
            "sha256": sums[MODEL_FILE],
            "metric": metric,
            "value": candidate,
            "promoted_at": _iso(decided),
            "forced": force,
            "previous": champ_version,
            "generation": head.generation + 1,
            "decision": decision.to_dict(),
        }
        try:
            write_json_atomic(_chain_uri(home, head.generation + 1), record, exclusive=True)
        except FileExistsError:
            # A retried PUT whose first attempt landed (lost response) finds its own record.
            if _read_generation(home, head.generation + 1) != json.loads(_json_bytes(record)):
                lost += 1  # another promotion took this generation: judge again against it
                continue
        _point_champion(home, head.generation + 1, record)
        return decision


def _gate(
    home: str | None,
    champion: Mapping[str, Any] | None,
    version: str,
    candidate: float | None,
    metric: str,
    force: bool,
) -> tuple[bool, str, str | None, float | None]:
    """(promote?, why, champion version, champion value) against this champion record."""
    if champion is None:
        return True, "no champion yet", None, None
    champ_version = str(champion["version"])
    if champ_version == version:
        return False, f"{version} is already the champion", champ_version, None
    try:
        champ_value = _champion_value(home, champ_version, metric)
    except (IntegrityError, VersionNotFoundError) as exc:
        return True, f"champion {champ_version} no longer verifies ({exc})", champ_version, None
    except RegistryError:
        if not force:
            raise
        return True, f"forced; champion {champ_version} has no {metric!r}", champ_version, None
    promoted, reason = _judge(candidate, champ_value, metric, champ_version, force)
    return promoted, reason, champ_version, champ_value


def _point_champion(home: str | None, generation: int, record: dict[str, Any]) -> None:
    """Write champion.json, then re-point it while the chain has moved past what was written.

    Why the loop: two winners of consecutive generations may write the pointer in either
    order. Each re-checks the chain after its own write, so the last writer always leaves the
    newest generation (a kill in between leaves a stale pointer, which readers step past).
    """
    uri = join(models_uri(home), CHAMPION_FILE)
    while True:
        write_json_atomic(uri, record)
        newer = _read_generation(home, generation + 1)
        if newer is None:
            return
        generation, record = generation + 1, newer
        while (later := _read_generation(home, generation + 1)) is not None:
            generation, record = generation + 1, later


def _judge(
    candidate: float | None, champion: float, metric: str, champ_version: str | None, force: bool
) -> tuple[bool, str]:
    if candidate is not None and candidate > champion:
        return True, f"{metric} {candidate:.6g} beats champion {champ_version} ({champion:.6g})"
    shown = "n/a" if candidate is None else f"{candidate:.6g}"
    if force:
        return True, f"forced: {metric} {shown} vs champion {champ_version} ({champion:.6g})"
    return False, f"{metric} {shown} does not beat champion {champ_version} ({champion:.6g})"


def _champion_value(home: str | None, champ_version: str, metric: str) -> float:
    # Only metrics.json is hashed here: it is the number being compared, and a full check of
    # the champion's model would download it on every retrain (load_model checks it anyway).
    vdir = version_uri(home, champ_version)
    sums = _read_sums(vdir, champ_version)
    data = _read_verified(vdir, champ_version, METRICS_FILE, sums)
    return _metric_value(_loads(data, METRICS_FILE), metric, champ_version)


def _record_decision(home: str | None, decision: PromotionDecision, when: datetime) -> None:
    name = f"{when:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}.json"
    uri = join(models_uri(home), DECISIONS_DIR, decision.version, name)
    write_json_atomic(uri, decision.to_dict(), exclusive=True)


def promote(home: str | None, version: str, metric: str = "mAP") -> PromotionDecision:
    """`multitag models promote VERSION`: make a verified version champion whatever its score."""
    return promote_if_better(home, version, metric, force=True)


# ---------------------------------------------------------------------------------- load


def load_metadata(home: str | None = None, version: str | None = None) -> ModelMetadata:
    """Verify every file of a version, then read its JSON files; `version=None`: the champion.

    Every sha256 in SHA256SUMS is checked, model.pkl's included (for the champion, also
    against champion.json), exactly as `load_model` does, but nothing is unpickled. Remote
    roots are downloaded to a local cache (MULTITAG_CACHE_DIR, default ~/.cache/multitag) and
    the downloaded bytes are what is hashed.
    """
    if version is None:
        champion = get_champion(home)
        if champion is None:
            raise NoChampionError(
                f"no champion model under {models_uri(home)}: run `multitag retrain --data ...` "
                "to train and promote one, or `multitag models promote VERSION` for an existing "
                "version (`multitag models list` shows them)"
            )
        version = str(champion["version"])
        sums = check_champion_pointer(home, champion)
    else:
        sums = _read_sums(version_uri(home, version), version)
    vdir = version_uri(home, version)
    blobs = {
        n: _read_verified(vdir, version, n, sums)
        for n in sorted(sums)
        if n != MODEL_FILE and not n.endswith(_LAZY_SUFFIXES)
    }
    model_path = _verified_file(home, vdir, version, MODEL_FILE, sums[MODEL_FILE])

    from multitag.training.thresholds import ThresholdSet

    return ModelMetadata(
        version=version,
        thresholds=ThresholdSet.from_json(_loads(blobs[THRESHOLDS_FILE], THRESHOLDS_FILE)),
        metrics=_loads(blobs[METRICS_FILE], METRICS_FILE),
        inference=_loads(blobs[INFERENCE_FILE], INFERENCE_FILE),
        sha256=sums[MODEL_FILE],
        model_path=model_path,
        uri=vdir,
        sums=dict(sums),
        fastpath=_loads(blobs[FASTPATH_FILE], FASTPATH_FILE) if FASTPATH_FILE in blobs else None,
        home=home,
    )


def verified_file(meta: ModelMetadata, name: str) -> Path:
    """A local copy of one file of a loaded version, hashed against its SHA256SUMS entry now.

    Why now and not in `load_metadata`: the ONNX files are large and a run opens at most one.
    """
    if name not in meta.sums:
        raise IntegrityError(
            f"model version {meta.version} has no {name} in {SUMS_FILE}; files: {sorted(meta.sums)}"
        )
    return _verified_file(meta.home, meta.uri, meta.version, name, meta.sums[name])


def load_model(home: str | None = None, version: str | None = None) -> LoadedModel:
    """Verify every file of a version, then unpickle it; `version=None` means the champion.

    Nothing is unpickled until every sha256 in SHA256SUMS matches (and, for the champion, the
    model's sha256 matches champion.json): see `load_metadata`.
    """
    return unpickle_model(load_metadata(home, version))


def unpickle_model(meta: ModelMetadata) -> LoadedModel:
    """Unpickle the model file of a `load_metadata` result from the very bytes just hashed.

    The file is read once into memory, hashed, and those bytes are what is unpickled (from a
    BytesIO): nothing re-opens the path after the check, so a file swapped between the hash
    and the load can never be unpickled. Re-hashed because the metadata may be older than this
    call (~0.1 s for resnet50).
    """
    from multitag.training.learner import load_learner_file

    data = meta.model_path.read_bytes()
    _check_sha(meta.version, MODEL_FILE, data, meta.sha256)
    learner = load_learner_file(io.BytesIO(data))
    return LoadedModel(
        meta.version, learner, meta.thresholds, meta.metrics, meta.inference, meta.sha256,
        meta.model_path,
    )  # fmt: skip


def cache_dir() -> Path:
    env = os.environ.get("MULTITAG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "multitag"


def _verified_file(home: str | None, vdir: str, version: str, name: str, expected: str) -> Path:
    """A local file whose bytes hash to `expected`; remote ones go through the cache."""
    source = join(vdir, name)
    if is_local(source):
        _, path = fs_and_path(source)
        actual = _sha256_uri(source)
        if actual != expected:
            raise _mismatch(version, name, expected, actual)
        return Path(path)
    # Keyed by the root too: two registries may both hold a version called "v1".
    root_key = sha256_bytes(models_uri(home).encode("utf-8"))[:12]
    target = cache_dir() / "models" / root_key / version / name
    if target.is_file():
        with target.open("rb") as f:
            if _sha256_stream(f) == expected:
                return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{name}")
    fs, path = fs_and_path(source)
    try:
        with fs.open(path, "rb") as src, tmp.open("wb") as dst:
            actual = _sha256_stream(src, sink=dst)
        if actual != expected:
            raise _mismatch(version, name, expected, actual)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
