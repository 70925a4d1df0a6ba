"""Loading a version: every file verified first, the pickle unpickled only from checked bytes.

Remote roots are copied into a local cache (`cache_dir()`), and the downloaded bytes are what
is hashed, so a cache file changed on disk is noticed and fetched again.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitag.hashing import sha256_bytes, sha256_stream, sha256_uri
from multitag.registry.champion import get_champion
from multitag.registry.errors import IntegrityError, NoChampionError
from multitag.registry.integrity import check_sha, mismatch_error, read_sums, read_verified
from multitag.registry.layout import (
    FASTPATH_FILE,
    INFERENCE_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SUMS_FILE,
    THRESHOLDS_FILE,
    loads_json,
    models_uri,
    version_uri,
)
from multitag.storage import fs_and_path, is_local, join
from multitag.training.thresholds import ThresholdSet

# Large binaries are hashed when they are opened (`verified_file`), not read into memory by
# `load_metadata`.
_LAZY_SUFFIXES = (".onnx", ".pt2")


@dataclass
class ModelMetadata:
    """A verified version's JSON files and model file, with nothing unpickled.

    Why: a tagger whose verified ONNX fast path is cached (keyed by `sha256`) needs only the
    thresholds and the input spec; unpickling the learner means importing fastai (seconds).
    """

    version: str
    thresholds: ThresholdSet
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
    thresholds: ThresholdSet
    metrics: dict[str, Any]
    inference: dict[str, Any]
    sha256: str
    model_path: Path  # the local file that was unpickled (a verified cache copy for remote roots)


def check_champion_pointer(home: str | None, champion: Mapping[str, Any]) -> dict[str, str]:
    """The champion version's SHA256SUMS, after checking the pointer's model sha256 against it.

    Why a separate step: tagging resolves the champion once and then loads that version by
    its id; without this check a pointer naming other bytes than the version holds would go
    unnoticed on that path. Hashing the files themselves is the loader's job.
    """
    version = str(champion["version"])
    sums = read_sums(version_uri(home, version), version)
    if champion["sha256"] != sums[MODEL_FILE]:
        raise IntegrityError(
            f"champion.json names {version} with model.pkl sha256 {champion['sha256']}, but its "
            f"{SUMS_FILE} says {sums[MODEL_FILE]}; the pointer does not describe that version, "
            "so it was not used. Run `multitag models promote VERSION` to repair it."
        )
    return sums


def load_metadata(home: str | None = None, version: str | None = None) -> ModelMetadata:
    """Verify every file of a version, then read its JSON files; `version=None`: the champion
    (the only one: with champions under several model names, a RegistryError lists them).

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
                "version (`multitag models list` shows them); with several model names, load "
                "NAME's champion via `registry.resolve_model_ref(home, NAME)`"
            )
        version = str(champion["version"])
        sums = check_champion_pointer(home, champion)
    else:
        sums = read_sums(version_uri(home, version), version)
    vdir = version_uri(home, version)
    blobs = {
        n: read_verified(vdir, version, n, sums)
        for n in sorted(sums)
        if n != MODEL_FILE and not n.endswith(_LAZY_SUFFIXES)
    }
    model_path = _verified_file(home, vdir, version, MODEL_FILE, sums[MODEL_FILE])

    return ModelMetadata(
        version=version,
        thresholds=ThresholdSet.from_json(loads_json(blobs[THRESHOLDS_FILE], THRESHOLDS_FILE)),
        metrics=loads_json(blobs[METRICS_FILE], METRICS_FILE),
        inference=loads_json(blobs[INFERENCE_FILE], INFERENCE_FILE),
        sha256=sums[MODEL_FILE],
        model_path=model_path,
        uri=vdir,
        sums=dict(sums),
        fastpath=loads_json(blobs[FASTPATH_FILE], FASTPATH_FILE)
        if FASTPATH_FILE in blobs
        else None,
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
    # Lazy: multitag.training.learner imports fastai and torch (seconds); a tagger whose fast
    # path is cached never unpickles, so it never pays for them.
    from multitag.training.learner import load_learner_file

    data = meta.model_path.read_bytes()
    check_sha(meta.version, MODEL_FILE, data, meta.sha256)
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
        actual = sha256_uri(source)
        if actual != expected:
            raise mismatch_error(version, name, expected, actual)
        return Path(path)
    # Keyed by the root too: two registries may both hold a version called "v1".
    root_key = sha256_bytes(models_uri(home).encode("utf-8"))[:12]
    target = cache_dir() / "models" / root_key / version / name
    if target.is_file():
        with target.open("rb") as f:
            if sha256_stream(f) == expected:
                return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{name}")
    fs, path = fs_and_path(source)
    try:
        with fs.open(path, "rb") as src, tmp.open("wb") as dst:
            actual = sha256_stream(src, sink=dst)
        if actual != expected:
            raise mismatch_error(version, name, expected, actual)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
