"""The local dataset cache: its layout, its lock, and the manifest a cache hit is checked by.

Why a manifest: a cached folder is only returned as it is when it was made by a complete
extraction of the same source (URL, archive sha256, a local archive's size and mtime) and
still holds every file at its recorded size; anything else is rebuilt, not trusted. A pull
from an fsspec store (`multitag.data.remote`) records its listing key and each file's size
and ETag instead, and the URL's last pull is remembered (`record_last_pull`) so the next
changed listing can reuse the files that did not change.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multitag.data.archives import archive_name
from multitag.hashing import sha256_bytes, sha256_file
from multitag.storage import read_json, write_json_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one process per cache is assumed
    fcntl = None  # type: ignore[assignment]

MANIFEST_NAME = ".multitag-manifest.json"
_MANIFEST_FORMAT = "multitag-dataset/1"
CACHE_DIR = ".fastai"
_KEY_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # a cache folder name, never a path


@dataclass(frozen=True)
class Source:
    """Where an archive comes from."""

    url: str  # what untar_data fetches (http(s):// or file://), or an fsspec URL (s3://...)
    local: Path | None  # the file behind a file:// URL, to notice when it changes


@dataclass(frozen=True)
class DatasetCache:
    """The paths of one dataset's cache entry (see `multitag.data.datasets` for the layout)."""

    root: Path  # <home>/datasets
    key: str  # <stem>-<hash of the URL>

    @property
    def target(self) -> Path:
        return self.root / self.key

    @property
    def base(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def archive_rel(self) -> str:
        return f"archives/{self.key}"  # relative to base: no home path in fastai's config.ini

    @property
    def archive_dir(self) -> Path:
        return self.base / self.archive_rel

    @property
    def staging_dir(self) -> Path:
        return self.base / "staging" / self.key

    @property
    def lock(self) -> Path:
        return self.base / "locks" / f"{self.key}.lock"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One acquire per dataset at a time: concurrent flows must not extract over each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def remove_leftovers(cache: DatasetCache) -> None:
    """Staging folders and `.part` files of an acquire that was killed (we hold the lock)."""
    shutil.rmtree(cache.staging_dir, ignore_errors=True)
    if cache.archive_dir.is_dir():
        for part in cache.archive_dir.glob("*.part"):
            part.unlink()


def discard_archive(cache: DatasetCache) -> None:
    """A bad or partial archive must not satisfy the next call: it downloads again."""
    shutil.rmtree(cache.archive_dir, ignore_errors=True)


def read_manifest(target: Path) -> dict[str, Any] | None:
    path = target / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = read_json(str(path))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == _MANIFEST_FORMAT
    return data if ok and isinstance(data.get("files"), dict) else None


def cache_problem(
    target: Path, manifest: dict[str, Any] | None, source: Source, expected: str | None
) -> tuple[str | None, bool]:
    """What is wrong with a cached dataset (None: nothing), and whether its source is stale.

    Cheap on purpose (names and sizes, no hashing): it runs on every cache hit.
    """
    if manifest is None:
        return f"has no valid {MANIFEST_NAME} (interrupted, or not made by acquire)", False
    if manifest.get("url") != source.url:
        return f"was extracted from {manifest.get('url')!r}, not {source.url!r}", True
    if expected and manifest.get("archive_sha256") != expected:
        return "came from an archive whose sha256 differs from the one asked for", True
    if source.local is not None and manifest.get("source_stat") != _stat_of(source.local):
        return f"is older than its source archive {source.local} (which changed)", True
    damage = _damage(target, manifest["files"])
    return (f"is damaged: {damage}", False) if damage else (None, False)


def _damage(target: Path, files: dict[str, int]) -> str | None:
    missing, resized = [], []
    for rel, size in files.items():
        try:
            actual = (target / rel).lstat().st_size
        except FileNotFoundError:
            missing.append(rel)
            continue
        if actual != size:
            resized.append(rel)
    parts = []
    if missing:
        parts.append(f"{len(missing)} file(s) missing ({_sample(missing)})")
    if resized:
        parts.append(f"{len(resized)} file(s) changed size ({_sample(resized)})")
    return "; ".join(parts) or None


def _sample(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def kept_archive_matches(cache: DatasetCache, url: str, manifest: dict[str, Any] | None) -> bool:
    """Can a damaged dataset be rebuilt from the archive we kept, without downloading?"""
    archive = cache.archive_dir / archive_name(url)
    if not archive.is_file():
        return False
    known = (manifest or {}).get("archive_sha256")
    return known is None or sha256_file(archive) == known


def _stat_of(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_sizes(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                sizes[rel] = path.lstat().st_size
    return sizes


def write_manifest(
    folder: Path,
    source: Source,
    archive: Path | None,
    digest: str | None,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Written last into a complete folder; `archive` None for a folder pulled file by file.

    `extra`: a remote source's listing key and per-file (size, tag), which the next pull of
    the same URL reads to reuse unchanged files.
    """
    files = _file_sizes(folder)
    write_json_atomic(
        str(folder / MANIFEST_NAME),
        {
            "format": _MANIFEST_FORMAT,
            "url": source.url,
            "archive": archive.name if archive else None,
            "archive_sha256": digest,
            "source_stat": _stat_of(source.local) if source.local else None,
            "extracted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "n_files": len(files),
            "total_bytes": sum(files.values()),
            "files": files,
            **(extra or {}),
        },
    )


def listing_problem(
    target: Path, manifest: dict[str, Any] | None, listing_sha256: str
) -> str | None:
    """What is wrong with a cached pull of a remote source (None: it can be used as it is).

    The folder is keyed by the listing key already; checking it again here guards a folder
    renamed by hand, and the sizes guard against damage, as for archives.
    """
    if manifest is None:
        return f"has no valid {MANIFEST_NAME} (interrupted, or not made by acquire)"
    if manifest.get("listing_sha256") != listing_sha256:
        return "was pulled from another listing of its source"
    damage = _damage(target, manifest["files"])
    return f"is damaged: {damage}" if damage else None


def last_pull_file(root: Path, url: str) -> Path:
    """Where the cache key of the last pull of a remote URL is kept (keyed by the URL)."""
    return root / CACHE_DIR / "pulls" / f"{sha256_bytes(url.encode('utf-8'))[:16]}.json"


def last_pull(root: Path, url: str) -> Path | None:
    """The folder of the last complete pull of `url`, if it is still there."""
    try:
        key = read_json(str(last_pull_file(root, url))).get("key")
    except (OSError, ValueError, AttributeError):
        return None
    folder = root / key if isinstance(key, str) and _KEY_RE.fullmatch(key) else None
    return folder if folder is not None and folder.is_dir() else None


def record_last_pull(root: Path, url: str, key: str) -> str | None:
    """Remember `key` as the newest pull of `url`: the next changed listing reuses its files.

    Returns the pull before the one this replaces (None if none, or still current): the
    caller removes it, so each URL keeps at most its two newest pulls on disk (the newest,
    and the one a run that started before it may still be reading).
    """
    last = last_pull_file(root, url)
    try:
        before = read_json(str(last))
    except (OSError, ValueError):
        before = {}
    if not isinstance(before, dict):
        before = {}
    if before.get("key") == key:
        return None
    previous = before.get("key")
    last.parent.mkdir(parents=True, exist_ok=True)
    pulled_at = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"url": url, "key": key, "previous": previous, "pulled_at": pulled_at}
    write_json_atomic(str(last), record)
    stale = before.get("previous")
    ok = isinstance(stale, str) and _KEY_RE.fullmatch(stale) and stale not in (key, previous)
    return stale if ok else None


def remove_pull(cache: DatasetCache) -> None:
    """Remove an old pull under its lock: renamed into staging first, so a reader never sees a
    half-deleted dataset folder under its published name."""
    with locked(cache.lock):
        if not cache.target.is_dir():
            return
        cache.staging_dir.mkdir(parents=True, exist_ok=True)
        aside = cache.staging_dir / f"removed-{os.getpid()}"
        os.rename(cache.target, aside)
        shutil.rmtree(cache.staging_dir, ignore_errors=True)
